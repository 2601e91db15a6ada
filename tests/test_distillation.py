"""Distillation: one network learns an exported model's answers (model_training.training.distillation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_training.data.datasets import DataError  # noqa: E402
from model_training.training.distillation import Teacher, distillation_loss  # noqa: E402


def test_the_teacher_loss_is_zero_only_at_the_teachers_answer_and_pulls_towards_it():
    teacher = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, 0.0]])
    assert float(distillation_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # logits that differ by a constant per row are the same probabilities
    assert float(distillation_loss(teacher + 3.0, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros_like(teacher, requires_grad=True)
    before = distillation_loss(student, teacher, 2.0)
    assert float(before.detach()) > 0.1
    before.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert float(distillation_loss(stepped, teacher, 2.0)) < float(before.detach())


def test_a_teacher_must_answer_the_students_classes_on_the_students_input(tiny_model):
    from uplink_server.model import Classifier

    clf = Classifier(tiny_model)
    Teacher(tiny_model, clf.classes, clf.spec)  # its own classes and input: accepted
    with pytest.raises(DataError, match="same classes"):
        Teacher(tiny_model, list(reversed(clf.classes)), clf.spec)
    with pytest.raises(DataError, match="preprocessing"):
        Teacher(tiny_model, clf.classes, type(clf.spec)(size=(96, 96)))
    with pytest.raises(DataError, match="not found"):
        Teacher(tiny_model.with_name("missing.onnx"), clf.classes, clf.spec)


def _kl_to_teacher(student_path, teacher_path, images) -> float:
    """Mean KL(teacher || student) of the two exported models on real films, at temperature 1."""
    from model_training.evaluation.calibration import softmax
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    t, s = Classifier(teacher_path), Classifier(student_path)
    x = np.stack([t.preprocess(decode(p)) for p in images])
    pt, ps = softmax(t.run(x)[0]), softmax(s.run(x)[0])  # raw logits: the networks' own answers
    return float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)))


def test_a_student_taught_by_a_model_answers_more_like_it_than_one_taught_by_labels(tiny_run, tmp_path, xray_paths):
    """Same data, seed and schedule; only the loss differs. The teacher (the session's tiny model) is a poor
    reader of films, so labels alone do not lead a student to its answers: the teacher's loss must."""
    from model_training.cli import main

    teacher = tiny_run / "model.onnx"
    runs = {}
    for name, extra in {"labels": [], "taught": ["--teacher", str(teacher), "--distill-weight", "1.0"]}.items():
        out = tmp_path / name
        rc = main(["train", "--data", str(tiny_run / "splits.csv"), "--arch", "efficientnet_lite0", "--pretrained",
                   "imagenet", "--img-size", "64", "--epochs", "2", "--freeze-epochs", "2", "--lr", "0.02",
                   "--samples-per-epoch", "48", "--batch-size", "8", "--workers", "0", "--seed", "3", "--augment", "none",
                   "--out", str(out), "--no-progress", *extra])
        assert rc == 0
        runs[name] = out / "model.onnx"
    films = [p for paths in xray_paths.values() for p in paths]
    labels, taught = (_kl_to_teacher(runs[n], teacher, films) for n in ("labels", "taught"))
    # 0.29 with the session's tiny teacher, now the same in every session (its augmentation is seeded by the run)
    assert taught < 0.5 * labels, (taught, labels)
    card = json.loads((tmp_path / "taught" / "model_card.json").read_text())
    assert card["training"]["config"]["teacher"] == str(teacher)
    assert card["training"]["config"]["distill_weight"] == 1.0


def test_distillation_settings_out_of_range_fail_before_any_work(tmp_path):
    from model_training.training.train import TrainConfig, train

    with pytest.raises(DataError, match="distill-weight"):
        train(TrainConfig(data=[str(tmp_path / "none")], distill_weight=1.5, out=str(tmp_path / "run")))
    with pytest.raises(DataError, match="distill-temperature"):
        train(TrainConfig(data=[str(tmp_path / "none")], distill_temperature=0, out=str(tmp_path / "run")))
