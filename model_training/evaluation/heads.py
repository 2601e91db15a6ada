"""Training recipes screened on frozen features: one head each, fitted in seconds (scikit-learn style fit/predict).

- ``erm``: plain cross-entropy, classes weighted equally.
- ``group``: every (age group, class) cell weighs the same: the sampling model 1.5.0 was trained with.
- ``source``: every (source, class) cell weighs the same, so no hospital dominates a class.
- ``dro``: group DRO (Sagawa et al. 2020) over (source, class) groups: the worst group's loss is minimised.
- ``adversarial``: a hidden layer trained to predict the class while a gradient-reversed head tries to
  predict the source from it (Ganin et al. 2016): the embedding is pushed to forget the hospital.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

RECIPES = ("erm", "group", "source", "dro", "adversarial")


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def _cell_weights(cells: list) -> np.ndarray:
    """Per-sample weights giving every cell the same total (mean weight 1)."""
    counts = Counter(cells)
    w = np.array([1.0 / counts[c] for c in cells])
    return w * len(w) / w.sum()


class Head:
    """A head on standardised frozen features: ``fit(X, y, sources, age_groups)``, ``logits(X)``, ``embed(X)``."""

    def __init__(self, recipe: str = "erm", n_classes: int = 3, epochs: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-3, hidden: int = 128, adv_weight: float = 1.0, dro_eta: float = 0.05,
                 seed: int = 0):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
        self.recipe, self.n_classes, self.epochs, self.lr = recipe, n_classes, epochs, lr
        self.weight_decay, self.hidden, self.adv_weight, self.dro_eta, self.seed = weight_decay, hidden, adv_weight, dro_eta, seed

    def _std(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((X - self.mu) / self.sd, dtype=torch.float32)

    def fit(self, X: np.ndarray, y: np.ndarray, sources: list[str], age_groups: list[str] | None = None) -> "Head":
        torch.manual_seed(self.seed)
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-6
        xt, yt = self._std(X), torch.as_tensor(y, dtype=torch.long)
        dim = X.shape[1]
        adversarial = self.recipe == "adversarial"
        self.body = nn.Sequential(nn.Linear(dim, self.hidden), nn.ReLU(), nn.Dropout(0.2)) if adversarial else nn.Identity()
        self.cls = nn.Linear(self.hidden if adversarial else dim, self.n_classes)
        params = list(self.body.parameters()) + list(self.cls.parameters())
        src_names = sorted(set(sources))
        s_idx = torch.as_tensor([src_names.index(s) for s in sources])
        if adversarial:
            self.src_head = nn.Sequential(nn.Linear(self.hidden, 64), nn.ReLU(), nn.Linear(64, len(src_names)))
            params += list(self.src_head.parameters())
        if self.recipe == "group":
            w = _cell_weights([(a or s, c) for a, s, c in zip(age_groups or sources, sources, y)])
        elif self.recipe in ("source", "dro", "adversarial"):
            w = _cell_weights(list(zip(sources, y)))
        else:
            w = _cell_weights(list(y))
        wt = torch.as_tensor(w, dtype=torch.float32)
        cells = sorted(set(zip(sources, y.tolist())))
        g_idx = torch.as_tensor([cells.index(c) for c in zip(sources, y.tolist())])
        q = torch.ones(len(cells)) / len(cells)  # DRO's weights over groups
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        ce = nn.CrossEntropyLoss(reduction="none")
        for step in range(self.epochs):
            self.body.train()
            h = self.body(xt)
            per = ce(self.cls(h), yt)
            if self.recipe == "dro":
                g_loss = torch.zeros(len(cells)).index_add_(0, g_idx, per) / torch.bincount(g_idx, minlength=len(cells))
                q = q * torch.exp(self.dro_eta * g_loss.detach())
                q = q / q.sum()
                loss = (q * g_loss).sum()
            else:
                loss = (per * wt).mean()
            if adversarial:
                lam = self.adv_weight * min(1.0, 2 * step / self.epochs)  # ramp up, as in Ganin et al.
                loss = loss + (ce(self.src_head(_Reverse.apply(h, lam)), s_idx) * wt).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.body.eval()
        return self

    @torch.no_grad()
    def embed(self, X: np.ndarray) -> np.ndarray:
        """What the classifier reads: the standardised features, or the adversarial hidden layer."""
        return self.body(self._std(X)).numpy()

    @torch.no_grad()
    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.cls(self.body(self._std(X))).numpy()

    def cam(self, fmaps: np.ndarray, k: np.ndarray) -> np.ndarray | None:
        """Class activation maps (N, h, w) of class ``k[i]`` for linear heads (None for the hidden-layer one):
        the GAP-then-linear identity, with the standardisation folded into the weights."""
        if self.recipe == "adversarial":
            return None
        w = self.cls.weight.detach().numpy() / self.sd  # (K, C)
        return np.einsum("nchw,nc->nhw", fmaps, w[k])
