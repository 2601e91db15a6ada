"""Frozen backbone features of many images, cached on disk, for fast screens of training recipes.

A screen fits only a head on these features, so one pass over the data (a few minutes on a CPU)
serves every recipe and every held-out fold. The pooled embedding is kept for all images; the
last feature map (for heatmaps) only for the images asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uplink_server.preprocessing import PreprocessSpec

from ..data.datasets import Record
from ..networks.architectures import create_model

# Preprocessing variants a screen compares, by name (see PreprocessSpec): what the backbone sees. Names
# join with "+" (equalize+lungs).
VARIANTS = {
    "plain": {},
    "equalize": {"intensity": "equalize"},
    "clahe": {"intensity": "clahe"},
    "crop": {"crop": 0.08},
    "lungs": {"roi": "lungs"},
    "lungmask": {"roi": "lungmask"},
}


def variant_spec(name: str, size: int = 224) -> PreprocessSpec:
    fields = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown preprocessing variant {part!r}: use {', '.join(VARIANTS)} or '+' combinations")
        fields.update(VARIANTS[part])
    return PreprocessSpec(size=(size, size), **fields)


class Features:
    """Embeddings (N, C) in the order of ``paths``; feature maps (M, C, h, w) for ``map_paths``."""

    def __init__(self, paths: list[str], emb: np.ndarray, map_paths: list[str], maps: np.ndarray):
        self.paths, self.emb, self.map_paths, self.maps = paths, emb, map_paths, maps
        self._index = {p: i for i, p in enumerate(paths)}
        self._map_index = {p: i for i, p in enumerate(map_paths)}

    def of(self, records: list[Record]) -> np.ndarray:
        return self.emb[[self._index[r.path] for r in records]]

    def maps_of(self, paths: list[str]) -> np.ndarray:
        return self.maps[[self._map_index[p] for p in paths]].astype(np.float32)


def _cache_key(arch: str, pretrained: str, spec: PreprocessSpec, paths: list[str], map_paths: list[str]) -> str:
    h = hashlib.sha1(json.dumps([arch, pretrained, spec.to_dict(), paths, map_paths]).encode()).hexdigest()[:12]
    return h


class _FeatureMap(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def _onnx_backbone(arch: str, pretrained: str, size: tuple[int, int], path: Path):
    """The frozen backbone as an ONNX Runtime session (about three times torch's eager speed on a CPU)."""
    import warnings

    import onnxruntime as ort

    model, _ = create_model(arch, num_classes=1, pretrained=pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FeatureMap(model).eval(), (torch.zeros(1, 3, *size),), str(path), input_names=["input"],
                          output_names=["fmap"], dynamic_axes={"input": {0: "batch"}, "fmap": {0: "batch"}},
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, (os.cpu_count() or 1))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def extract(records: list[Record], spec: PreprocessSpec, arch: str = "efficientnet_lite0", pretrained: str = "imagenet",
            map_paths: list[str] | None = None, cache_dir: Path | None = None, batch_size: int = 64,
            progress: bool = True) -> Features:
    """Features of every record through a frozen (ImageNet or given) backbone, cached under ``cache_dir``."""
    from ..data.datasets import load_input  # what the training loader gives the network

    paths = sorted({r.path for r in records})
    map_paths = sorted(set(map_paths or []) & set(paths))
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"features-{arch}-{_cache_key(arch, pretrained, spec, paths, map_paths)}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            return Features(paths, z["emb"], map_paths, z["maps"])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sess = _onnx_backbone(arch, pretrained, spec.size, Path(tmp) / "backbone.onnx")
    want = {p: i for i, p in enumerate(map_paths)}
    emb, maps = [], [None] * len(map_paths)
    # decoding costs about a quarter of the network here: in line, without a loader process shipping tensors
    for start in tqdm(range(0, len(paths), batch_size), desc=f"features ({spec.intensity}, crop {spec.crop}, {spec.roi})",
                      disable=not progress):
        chunk = paths[start:start + batch_size]
        x = np.stack([load_input(p, spec) for p in chunk])
        fmap = sess.run(["fmap"], {"input": x})[0]
        emb.append(fmap.mean(axis=(2, 3)))
        for j, p in enumerate(chunk):
            i = want.get(p)
            if i is not None:
                maps[i] = fmap[j].astype(np.float16)
    emb_arr = np.concatenate(emb).astype(np.float32)
    maps_arr = np.stack(maps) if maps else np.zeros((0,), np.float16)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, emb=emb_arr, maps=maps_arr)
    return Features(paths, emb_arr, map_paths, maps_arr)
