"""The ranker: an MLP that orders one request's candidates, trained with a listwise loss.

Each candidate is a row of features (each source's score and rank, the pair features, the towers'
score); the loss is the softmax cross-entropy of the request's targets over its candidates (ListNet
with one-hot targets), so the model learns to put what the user went on to do first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class RankerConfig:
    hidden: int = 64
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    lists_per_batch: int = 64
    patience: int = 6  # epochs without a better validation NDCG@10
    validation_share: float = 0.15
    seed: int = 0


CONSTANT = 1e-5  # a training standard deviation below this: the feature is treated as constant


class Ranker(nn.Module):
    """Standardised features -> MLP -> one score per candidate."""

    def __init__(self, n_features: int, cfg: RankerConfig, mean: np.ndarray, std: np.ndarray,
                 base: int | None = None):
        super().__init__()
        self.cfg, self.base = cfg, base
        # A feature that never varied in training (no query in the log: the lexical columns) is held at
        # its mean, so a value serving sees for the first time cannot blow up through a tiny scale.
        std = np.where(np.asarray(std) < CONSTANT, np.inf, std)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        # GELU's tanh form: NumPy computes it in a fifth of erf's time, on the serving path (``score``).
        self.net = nn.Sequential(nn.Linear(n_features, cfg.hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.hidden, 1))
        # With a base column (the profile model's score), the MLP learns a correction to it and starts at
        # zero: the ranker begins as the towers' order and moves only where its lists say so.
        if base is not None:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean) / self.std).squeeze(-1)
        return out + x[..., self.base] if self.base is not None else out

    def score(self, features: np.ndarray) -> np.ndarray:
        """The forward pass in NumPy with the current weights: for one request's few hundred candidates
        torch's per-call overhead was most of the cost (0.23 ms against 0.07)."""
        (w1, b1), (w2, b2), (w3, b3) = self._weights()
        x = (features.astype(np.float32) - self._np_mean) / self._np_std
        x = _gelu(x @ w1 + b1)
        x = _gelu(x @ w2 + b2)
        out = (x @ w3 + b3).ravel()
        return out + features[:, self.base].astype(np.float32) if self.base is not None else out

    def _weights(self):
        """NumPy copies of the layers, refreshed when training changed them (a version per state)."""
        version = tuple(p._version for p in self.parameters())
        if getattr(self, "_np_version", None) != version:
            layers = [m for m in self.net if isinstance(m, nn.Linear)]
            self._np = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in layers]
            self._np_mean, self._np_std = self.mean.numpy().copy(), self.std.numpy().copy()
            self._np_version = version
        return self._np

    def save(self, path: Path) -> None:
        torch.save({"config": asdict(self.cfg), "n_features": int(self.mean.shape[0]), "base": self.base,
                    "state": self.state_dict()}, path)

    @staticmethod
    def load(path: Path) -> Ranker:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        n = saved["n_features"]
        model = Ranker(n, RankerConfig(**saved["config"]), np.zeros(n), np.ones(n), saved.get("base"))
        model.load_state_dict(saved["state"])
        return model.eval()


def _gelu(x: np.ndarray) -> np.ndarray:
    """torch's GELU, tanh form."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)))


@dataclass
class Lists:
    """Training lists: each request's candidate features and the weight of each candidate as a target."""

    features: list[np.ndarray]
    labels: list[np.ndarray]

    def useful(self) -> Lists:
        """Only lists with a target among their candidates teach anything."""
        keep = [k for k, y in enumerate(self.labels) if y.sum() > 0 and len(y) > 1]
        return Lists([self.features[k] for k in keep], [self.labels[k] for k in keep])


def _batch(lists: Lists, picked: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(lists.labels[k]) for k in picked)
    n_features = lists.features[picked[0]].shape[1]
    x = np.zeros((len(picked), width, n_features), dtype=np.float32)
    y = np.zeros((len(picked), width), dtype=np.float32)
    mask = np.zeros((len(picked), width), dtype=bool)
    for r, k in enumerate(picked):
        n = len(lists.labels[k])
        x[r, :n], y[r, :n], mask[r, :n] = lists.features[k], lists.labels[k], True
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over lists of -sum(label share * log softmax(scores)) over the list's candidates."""
    log_p = torch.log_softmax(scores.masked_fill(~mask, -1e9), dim=1)
    share = labels / labels.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(share * log_p.masked_fill(~mask, 0.0)).sum(dim=1).mean()


def ndcg10(model: Ranker, lists: Lists) -> float:
    """Mean NDCG@10 of the lists' targets (ties counted half), for early stopping."""
    total = 0.0
    for x, y in zip(lists.features, lists.labels, strict=True):
        s = model.score(x)
        for t in np.flatnonzero(y > 0):
            others = np.delete(s, t)
            rank = (others > s[t]).sum() + (others == s[t]).sum() / 2 + 1
            total += (1 / np.log2(rank + 1) if rank <= 10 else 0.0) / (y > 0).sum()
    return total / max(len(lists.labels), 1)


def fit(lists: Lists, cfg: RankerConfig | None = None, base: int | None = None) -> Ranker:
    """Train on most lists, stop early on the rest; keep the best epoch's weights (with a ``base``
    column, "no epoch" counts: the base's own order, if no epoch beats it on the held-out lists)."""
    cfg = cfg or RankerConfig()
    lists = lists.useful()
    if not lists.labels:
        raise ValueError("no training request has a target among its candidates")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = rng.permutation(len(lists.labels))
    n_val = int(len(order) * cfg.validation_share) if len(order) >= 20 else 0
    val = Lists([lists.features[k] for k in order[:n_val]], [lists.labels[k] for k in order[:n_val]])
    train_ids = order[n_val:]
    stacked = np.concatenate([lists.features[k] for k in train_ids])
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    model = Ranker(stacked.shape[1], cfg, mean, std, base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, stale = -1.0, None, 0
    if base is not None and n_val:
        best, best_state = ndcg10(model, val), {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(cfg.epochs):
        model.train()
        for b in range(0, len(train_ids), cfg.lists_per_batch):
            x, y, mask = _batch(lists, train_ids[b:b + cfg.lists_per_batch])
            loss = listwise_loss(model(x), y, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_ids = rng.permutation(train_ids)
        if not n_val:
            continue
        score = ndcg10(model, val)
        if score > best:
            best, stale = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model
