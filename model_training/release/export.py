"""Export to ONNX (logits, CAM, embedding) and check against torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OUTPUT_NAMES = ["logits", "cam", "embedding"]


class _AllOutputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_all(x)


class ExportMismatch(RuntimeError):
    pass


def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, int], check_inputs: np.ndarray | None = None, atol: float = 1e-4) -> dict:
    """Write ``path`` and verify ONNX Runtime matches torch within ``atol``."""
    model = model.eval()
    wrapper = _AllOutputs(model).eval()
    dummy = torch.randn(2, 3, *input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=17,
            dynamo=False,
        )
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = check_inputs if check_inputs is not None else np.random.default_rng(0).standard_normal((3, 3, *input_size)).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
    got = sess.run(OUTPUT_NAMES, {"input": x})
    diffs = {n: float(np.abs(r - g).max()) for n, r, g in zip(OUTPUT_NAMES, ref, got)}
    # float32 rounding through the network grows with the logits: relative to their size. Confident
    # trained models reach |logit| ~ 10 (1.5e-4 seen), untrained ones in smoke tests 1e7.
    scale = float(np.abs(ref[0]).max())
    tol = atol * max(1.0, scale)
    if diffs["logits"] > tol:
        raise ExportMismatch(f"ONNX and torch logits differ by {diffs['logits']:.2e} > {tol:.2e}")
    log.info("ONNX export %s: max |torch - onnx| = %s", path, diffs)
    return {"max_abs_diff": diffs, "atol": atol, "tolerance_used": tol, "logit_scale": scale, "checked_images": int(len(x))}
