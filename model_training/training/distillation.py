"""Distillation: train one network to answer as an exported model (an ensemble, usually) answers.

    python -m model_training train --data weights/cxr-screen.splits.csv --teacher weights/cxr-screen.onnx \
        --pretrained runs/unpacked/m0/model.onnx --frozen-bn all ...

Model 1.5.0 averages two EfficientNet-Lite0s: each served film pays for both. A student of one network learns from
the labels and from the teacher's softened probabilities on the very same augmented batch (Hinton et al., 2015), so
it can keep most of what averaging bought at the cost of one network. The teacher runs in ONNX Runtime, as the
server runs it, and must read the student's input exactly: same classes, same preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from uplink_server.preprocessing import PreprocessSpec

from ..data.datasets import DataError


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on probabilities softened by ``temperature``, times temperature squared so that its
    gradients keep the size of a cross-entropy's whatever the temperature (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                    log_target=True) * t * t


class Teacher:
    """An exported model whose raw logits on a training batch are the student's soft targets."""

    def __init__(self, path: str | Path, classes: list[str], spec: PreprocessSpec):
        from uplink_server.model import Classifier, ModelNotFound

        try:
            self.clf = Classifier(path)
        except ModelNotFound as exc:
            raise DataError(f"--teacher: {exc}") from None
        if self.clf.classes != list(classes):
            raise DataError(f"--teacher {path} answers {self.clf.classes}, the student learns {list(classes)}: "
                            "distillation needs the same classes in the same order")
        if self.clf.spec != spec:
            raise DataError(f"--teacher {path} reads its input as {self.clf.spec}, the student as {spec}: give the "
                            "student the teacher's size and preprocessing")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's raw logits (before its temperature) for a batch the student is about to see."""
        out = self.clf.run(x.detach().cpu().numpy())[0]  # run() makes it a contiguous float32 batch
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
