"""Serving Keras models (``.keras``, ``.h5``) trained on Colab, behind the
``keras`` extra (``pip install tensorflow-cpu keras``).

A Keras model needs a card (``<model>.card.json``) saying its classes and
preprocessing, e.g. Xception: size 150, mean/std 0.5 (``x / 127.5 - 1``),
layout NHWC. ``outputs.activation`` says whether the model ends in logits or
softmax. Heatmaps are Grad-CAM on the last 4-D feature map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_card(model_path: Path, classes: list[str], size: int, mean: float, std: float,
               activation: str = "logits", name: str | None = None, version: str = "") -> Path:
    """Create the card a Keras model needs (``python -m uplink_server keras-card``)."""
    card = {
        "name": name or Path(model_path).stem,
        "version": version,
        "format": "keras",
        "classes": classes,
        "preprocessing": {"size": [size, size], "mean": [mean] * 3, "std": [std] * 3, "channels": 3,
                          "resample": "bilinear", "layout": "NHWC"},
        "outputs": {"activation": activation},
        "calibration": {"temperature": 1.0},
        "uncertain_threshold": 0.0,
    }
    out = Path(model_path).with_name(Path(model_path).name.rsplit(".", 1)[0] + ".card.json")
    out.write_text(json.dumps(card, indent=2))
    return out


class KerasBackend:
    def __init__(self, path: Path, card: dict):
        try:
            import keras
            import tensorflow as tf
        except ImportError as exc:
            raise ImportError("serving Keras models needs the keras extra: pip install tensorflow-cpu keras") from exc
        self.tf = tf
        self.model = keras.models.load_model(str(path), compile=False)
        self.softmax_output = card.get("outputs", {}).get("activation", "logits") == "softmax"
        # the last layer whose output is a 4-D feature map (a nested backbone counts as one layer)
        feat_layer = None
        for layer in self.model.layers:
            shape = getattr(layer, "output", None)
            shape = getattr(shape, "shape", None)
            if shape is not None and len(shape) == 4:
                feat_layer = layer
        if feat_layer is None:
            raise ValueError(f"{path}: no 4-D feature map found for Grad-CAM")
        self.grad_model = keras.Model(self.model.inputs, [feat_layer.output, self.model.output])

    def __call__(self, x: np.ndarray):
        tf = self.tf
        inp = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            fmap, out = self.grad_model(inp, training=False)
            if isinstance(out, (list, tuple)):  # Keras 3 wraps a single output in a list
                out = out[0]
            tape.watch(fmap)
            logits = tf.math.log(tf.clip_by_value(out, 1e-7, 1.0)) if self.softmax_output else out
            top = tf.argmax(logits, axis=1)
            score = tf.reduce_sum(tf.gather(logits, top, axis=1, batch_dims=1))
        grads = tape.gradient(score, fmap)  # (N, h, w, C)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # Grad-CAM channel weights
        cam = tf.einsum("nhwc,nc->nhw", fmap, weights).numpy()
        k = logits.shape[1]
        # the CAM is for the top class; the server picks cam[:, top]
        cams = np.zeros((x.shape[0], k, *cam.shape[1:]), np.float32)
        for i, t in enumerate(top.numpy()):
            cams[i, t] = cam[i]
        emb = tf.reduce_mean(fmap, axis=(1, 2)).numpy()
        return logits.numpy().astype(np.float32), cams, emb
