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

    from ..release.ensemble import ensemble_members

    model = onnx.load(str(path))
    if ensemble_members(model) > 1:
        raise PretrainedError(f"{path} is an ensemble: take it apart with `python -m model_training unpack` and "
                              "continue from one member")
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model.graph, init


def _model_classes(path: Path) -> list[str] | None:
    """The class names of an exported model, from its card (None when it has none)."""
    import json

    from uplink_server.model import find_card

    card = find_card(path)
    if card is None:
        return None
    return list(json.loads(card.read_text()).get("classes") or []) or None


def _grown_head(path: Path, w: np.ndarray, b: np.ndarray, net: nn.Module, classes: list[str] | None):
    """The classifier rows of ``net`` for ``classes``: the exported model's rows where it knew the class, the network's
    own fresh rows for the classes it did not (a 3-class model continued into a 4-class network, e.g. to train a
    leave-one-source-out fold from a model that never saw the held-out source)."""
    old = _model_classes(path)
    if not classes or not old or len(old) != w.shape[0] or not set(old) < set(classes):
        raise PretrainedError(f"{path}: its classifier is {w.shape[0]} classes x {w.shape[1]} features, the "
                              f"network's {tuple(net.classifier.weight.shape)}: train with the model's classes"
                              + ("" if old else " (its card, which would name them, is missing)"))
    new_w = net.classifier.weight.detach().cpu().numpy().copy()
    new_b = net.classifier.bias.detach().cpu().numpy().copy()
    for i, name in enumerate(old):
        new_w[classes.index(name)], new_b[classes.index(name)] = w[i], b[i]
    return new_w, new_b


def load_onnx_weights(net: nn.Module, path: str | Path, classes: list[str] | None = None) -> dict:
    """Put the weights of the exported model at ``path`` into ``net`` (a CXRNet of the same architecture). Its class
    count must be the network's, or ``classes`` (the network's class names) must include every class of the model,
    named by its card: the head then grows (``_grown_head``). Returns {'matched': tensors set, 'convs':
    convolutions, 'source': path, 'grown': new class names}."""
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
        grown: list[str] = []
        if tuple(w.shape) != tuple(net.classifier.weight.shape):
            if w.shape[1] != net.classifier.weight.shape[1]:
                raise PretrainedError(f"{path}: its classifier reads {w.shape[1]} features, the network's "
                                      f"{net.classifier.weight.shape[1]}: not this architecture")
            w, b = _grown_head(path, w, b, net, classes)
            grown = [c for c in classes if c not in (_model_classes(path) or [])]
        state[id(net.classifier.weight)], state[id(net.classifier.bias)] = w, b
        for p in net.parameters():
            if id(p) in state:
                p.copy_(torch.tensor(np.array(state[id(p)]), dtype=p.dtype))  # numpy_helper arrays are read-only
    return {"matched": len(state), "convs": len(convs), "mode": "onnx", "source": str(path), "grown": grown}
