"""A shipped ONNX model's weights back in its torch network, to train on from where it stopped.

    python -m model_training train --pretrained weights/cxr-screen-tb.onnx --frozen-bn all ...

Run folders (and their checkpoints) do not outlive a session, but the shipped ONNX file holds every weight: the
exporter folded each BatchNorm into the convolution before it. Loading puts the folded kernel and bias back into the
convolution and its BatchNorm, with the BatchNorm made an identity (mean 0, variance 1 - eps, scale 1): the network
computes what the ONNX file computes. Its BatchNorm statistics must then stay frozen while it trains (``--frozen-bn
all``; ``train`` enforces it): recomputed from batches they would no longer undo the folding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .pretrained import PretrainedError


def _conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm | None]]:
    """Every convolution in forward order, with the BatchNorm that follows it before the next convolution."""
    pairs: list[list] = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            pairs.append([m, None])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and pairs and pairs[-1][1] is None:
            pairs[-1][1] = m
    return [tuple(p) for p in pairs]


def _initializers(path: Path):
    import onnx
    from onnx import numpy_helper

    from .ensemble import ensemble_members

    model = onnx.load(str(path))
    if ensemble_members(model) > 1:
        raise PretrainedError(f"{path} is an ensemble: take it apart with `python -m model_training unpack` and "
                              "continue from one member")
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model.graph, init


def load_onnx_weights(net: nn.Module, path: str | Path) -> dict:
    """Put the weights of the exported model at ``path`` into ``net`` (a CXRNet of the same architecture and class
    count). Returns {'matched': tensors set, 'convs': convolutions, 'source': path}."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {path}: no such file")
    graph, init = _initializers(path)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pairs = _conv_bn_pairs(net.backbone)
    if len(convs) != len(pairs):
        raise PretrainedError(f"{path} has {len(convs)} convolutions, the network {len(pairs)}: not this architecture")
    state = {}
    with torch.no_grad():
        for node, (conv, bn) in zip(convs, pairs):
            w = init.get(node.input[1])
            if w is None or tuple(w.shape) != tuple(conv.weight.shape):
                raise PretrainedError(f"{path}: convolution {node.name} has shape "
                                      f"{None if w is None else w.shape}, the network's {tuple(conv.weight.shape)}")
            b = init[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
            state[id(conv.weight)] = w
            if bn is None:  # a convolution with its own bias
                if conv.bias is None:
                    raise PretrainedError(f"{path}: convolution {node.name} has a bias the network has no place for")
                state[id(conv.bias)] = b
                continue
            state[id(bn.weight)] = np.ones_like(b)
            state[id(bn.bias)] = b
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
        gemm = [n for n in graph.node if n.op_type == "Gemm"]
        if len(gemm) != 1:
            raise PretrainedError(f"{path}: expected one classifier layer, found {len(gemm)}")
        w, b = init[gemm[0].input[1]], init[gemm[0].input[2]]
        if tuple(w.shape) != tuple(net.classifier.weight.shape):
            raise PretrainedError(f"{path}: its classifier is {w.shape[0]} classes x {w.shape[1]} features, the "
                                  f"network's {tuple(net.classifier.weight.shape)}: train with the model's classes")
        state[id(net.classifier.weight)], state[id(net.classifier.bias)] = w, b
        for p in net.parameters():
            if id(p) in state:
                p.copy_(torch.tensor(np.array(state[id(p)]), dtype=p.dtype))  # numpy_helper arrays are read-only
    return {"matched": len(state), "convs": len(convs), "mode": "onnx", "source": str(path)}
