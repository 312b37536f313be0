"""The baselines every report compares against, trained on the same split as the profile model.

popularity, item-item cosine (ItemKNN), EASE (Steck 2019, closed form) and an id-only sequential
model in the style of SASRec (Kang & McAuley 2018). Each returns a scorer: requests -> a
``[n_requests, n_items]`` score matrix over the catalogue in ``item_ids`` order. A request's history
is the user's positives strictly before the request's own time, so a scorer never sees its target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training.train import budget_spent

Scorer = Callable[[pd.DataFrame], np.ndarray]  # requests -> [n_requests, n_items] scores
EASE_LAMBDAS = (100.0, 250.0, 500.0, 1000.0, 2000.0)
EASE_MAX_ITEMS = 20_000  # the closed form inverts an items x items matrix


def positive_events(events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]) -> pd.DataFrame:
    """Positive events on catalogue items, in time order (then item id, the protocol's tie rule)."""
    pos = events[events["event_type"].isin(list(positives)) & events["item_id"].isin(set(item_ids))]
    return pos.sort_values(["event_timestamp", "item_id"], kind="stable")


class Histories:
    """Each user's positives as catalogue indexes in time order, with a lookup by time."""

    def __init__(self, events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]):
        index = {i: k for k, i in enumerate(item_ids)}
        pos = positive_events(events, positives, item_ids)
        ts = pd.to_datetime(pos["event_timestamp"], utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        items = pos["item_id"].map(index).to_numpy(dtype=np.int64)
        codes, users = pd.factorize(pos["user_id"], sort=False)
        order = np.argsort(codes, kind="stable")  # by user, each user's rows still in time order
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, len(order)]
        self._by_user: dict[str, tuple[np.ndarray, np.ndarray]] = {
            user: (ts[order[a:b]], items[order[a:b]]) for user, a, b in zip(users, starts, ends, strict=False)}

    def before(self, user: str, ts: pd.Timestamp) -> np.ndarray:
        """Catalogue indexes of the user's positives strictly before ``ts``, oldest first."""
        got = self._by_user.get(user)
        if got is None:
            return np.zeros(0, dtype=np.int64)
        cut = np.searchsorted(got[0], np.datetime64(pd.Timestamp(ts).tz_convert(None).asm8, "us"), side="left")
        return got[1][:cut]

    def sequences(self) -> list[np.ndarray]:
        """Every user's whole history (catalogue indexes, oldest first)."""
        return [items for _, items in self._by_user.values()]

    def matrix(self, requests: pd.DataFrame, n_items: int) -> np.ndarray:
        """Binary request x item matrix of each request's history."""
        x = np.zeros((len(requests), n_items), dtype=np.float32)
        for r, (user, ts) in enumerate(zip(requests["user_id"], requests["event_timestamp"], strict=True)):
            x[r, self.before(user, ts)] = 1.0
        return x


def interaction_matrix(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]) -> np.ndarray:
    """Binary user x item matrix of the training positives."""
    index = {i: k for k, i in enumerate(item_ids)}
    pos = positive_events(train_events, positives, item_ids)
    users = {u: k for k, u in enumerate(pos["user_id"].unique())}
    x = np.zeros((len(users), len(item_ids)), dtype=np.float64)
    x[pos["user_id"].map(users).to_numpy(), pos["item_id"].map(index).to_numpy()] = 1.0
    return x


def popularity_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]) -> Scorer:
    """Training positive counts: the same list for everyone."""
    counts = interaction_matrix(train_events, positives, item_ids).sum(axis=0)

    def score(requests: pd.DataFrame) -> np.ndarray:
        return np.tile(counts, (len(requests), 1))
    return score


def _history_scorer(weights: np.ndarray, histories: Histories, item_ids: list[str]) -> Scorer:
    """score = history (binary, before the request) @ an item x item weight matrix."""

    def score(requests: pd.DataFrame) -> np.ndarray:
        return histories.matrix(requests, len(item_ids)) @ weights
    return score


def cooccurrence_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str],
                        histories: Histories | None = None) -> Scorer:
    """ItemKNN: cosine over the binary user x item matrix; score = sum of similarities to the history.

    ``histories`` (default: the training events') supplies each request's history.
    """
    x = interaction_matrix(train_events, positives, item_ids).astype(np.float32)
    norms = np.sqrt(x.sum(axis=0)) + 1e-12
    sim = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(sim, 0.0)
    return _history_scorer(sim, histories or Histories(train_events, positives, item_ids), item_ids)


def ease_weights(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE's closed form: B = I - P / diag(P) with P = (XᵀX + λI)⁻¹, zero diagonal."""
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def ease_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str],
                lam: float = EASE_LAMBDAS[0], histories: Histories | None = None) -> Scorer:
    return _history_scorer(ease_weights(interaction_matrix(train_events, positives, item_ids), lam),
                           histories or Histories(train_events, positives, item_ids), item_ids)


# --- SASRec-style sequential baseline: item ids only, no text, no features ---------------------------


@dataclass
class SequentialConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    max_seconds: float = 120.0  # a baseline must not dominate `persona train`
    eval_every: int = 5
    patience: int = 3  # evaluations without a better validation NDCG@10
    seed: int = 0


class SASRec(nn.Module):
    """Causal self-attention over the last ``max_len`` item ids; the output at each step scores the
    next item against the shared id embeddings (full softmax)."""

    def __init__(self, n_items: int, cfg: SequentialConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)  # 0 = padding
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        for emb in (self.items, self.positions):  # small: the logits are dot products with these
            nn.init.normal_(emb.weight, std=cfg.dim ** -0.5)

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: [batch, max_len] item ids + 1, left-padded with 0; returns [batch, max_len, dim]."""
        pos = torch.arange(seq.shape[1], device=seq.device)
        x = self.drop(self.items(seq) + self.positions(pos)[None])
        causal = torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=seq.device).triu(1)
        return self.norm(self.encoder(x, mask=causal, src_key_padding_mask=seq == 0))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.items.weight[1:].T


def _left_pad(seqs: list[np.ndarray], max_len: int) -> torch.Tensor:
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[r, -len(s):] = s + 1
    return torch.from_numpy(out)


def sequential_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str],
                      histories: Histories, validate: Callable[[Scorer], float] | None = None,
                      cfg: SequentialConfig | None = None, progress: bool = True,
                      device: torch.device | str = "cpu") -> Scorer:
    """Train SASRec on the training positives (early stopping on ``validate``), then score requests
    from each user's history (``histories``) before the request. ``device``: where Persona trains,
    so that on a GPU the baseline gets the same hardware within its time budget."""
    cfg = cfg or SequentialConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_hist = Histories(train_events, positives, item_ids)
    seqs = [s[-(cfg.max_len + 1):] for s in train_hist.sequences() if len(s) >= 2]
    model = SASRec(len(item_ids), cfg).to(device)

    @torch.no_grad()
    def score(requests: pd.DataFrame) -> np.ndarray:
        model.eval()
        seq = _left_pad([histories.before(u, t) for u, t in
                         zip(requests["user_id"], requests["event_timestamp"], strict=True)], cfg.max_len)
        out = []
        for s in range(0, len(seq), 512):
            h = model.hidden(seq[s:s + 512].to(device))[:, -1]
            out.append(model.logits(h).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(item_ids)), dtype=np.float32)

    if not seqs:
        return score
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, best, best_state, stale = time.monotonic(), -1.0, None, 0
    bar = tqdm(range(cfg.max_epochs), desc="sequential baseline", disable=not progress, leave=False)
    for epoch in bar:
        epoch_started = time.monotonic()
        model.train()
        losses = []
        order = rng.permutation(len(seqs))  # each sequence once an epoch
        for b in range(0, len(seqs), cfg.batch_size):
            batch = [seqs[i] for i in order[b:b + cfg.batch_size]]
            padded = _left_pad(batch, cfg.max_len + 1).to(device)
            inputs, targets = padded[:, :-1], padded[:, 1:]
            mask = (inputs > 0) & (targets > 0)
            loss = nn.functional.cross_entropy(model.logits(model.hidden(inputs)[mask]), targets[mask] - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", best=f"{max(best, 0):.4f}")
        now = time.monotonic()
        out_of_time = budget_spent(now - start, now - epoch_started, cfg.max_seconds)
        if validate and ((epoch + 1) % cfg.eval_every == 0 or out_of_time):
            ndcg = validate(score)
            if ndcg > best:
                best, stale = ndcg, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            if stale >= cfg.patience:
                break
        if out_of_time:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return score
