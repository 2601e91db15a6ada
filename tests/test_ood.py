"""The shipped model's "is this a frontal chest X-ray" gate, on real data.

Targets (issue "Model server"): refuse at most 1 % of real chest X-rays (the
shipped model's held-out test split, every source) and at least 99 % of the
non-chest set in benchmarks/non_chest.py (photographs, other modalities,
faces, a chart, noise, blank images). `python -m benchmarks.bench_ood` prints
the same numbers.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_ood import accepted_non_chest, held_out_xrays, refused_xrays
from uplink_server.model import Classifier, default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().is_file(), reason="no shipped model in weights/")


@pytest.fixture(scope="module")
def shipped():
    return Classifier(default_model_path())


@pytest.fixture(scope="module")
def images():
    pytest.importorskip("skimage")
    from benchmarks.non_chest import non_chest_images

    return non_chest_images()


def test_refuses_non_chest_images(shipped, images):
    accepted = accepted_non_chest(shipped, images)
    assert len(images) >= 120
    assert len(accepted) <= 0.01 * len(images), f"accepted as chest X-rays: {accepted}"


@pytest.mark.parametrize("name,reason", [
    ("retina-gray", "round field of view"),  # gray fundus photographs pass the colour check
    ("retina-gray-rot90", "round field of view"),
    ("gradient", "no structure"),  # a smooth ramp is not blank, and the kNN gate alone let it through
])
def test_cheap_checks_catch_what_the_gate_misses(shipped, images, name, reason):
    p = shipped.predict(images[name], heatmap=False)
    assert p.refused and reason in p.refusal["message"], (name, p.refusal)


def test_accepts_real_chest_xrays(shipped, data_root):
    pytest.importorskip("model_training.data.datasets")
    paths = held_out_xrays(default_model_path())
    refused = refused_xrays(shipped, paths)
    assert len(paths) > 1500
    assert len(refused) <= 0.01 * len(paths), f"{len(refused)} refused: {refused[:5]}"
