"""The baselines every report compares against, trained on the same split as the profile model.

popularity, item-item cosine (ItemKNN), EASE (Steck 2019, closed form), the user's own recent
behaviour list and an id-only sequential model in the style of SASRec (Kang & McAuley 2018). Each
returns a scorer: requests -> a ``[n_requests, n_items]`` score matrix over the catalogue in
``item_ids`` order. A request's history is the user's events of the given types (the positives unless
said otherwise) strictly before the request's own time, so a scorer never sees its target.

Each fits in memory for any catalogue size: user x item matrices are sparse, EASE inverts a Gram
matrix over at most ``EASE_MAX_ITEMS`` items (the most popular; the rest score 0 from it), and
ItemKNN keeps ``KNN_NEIGHBOURS`` neighbours per item past ``KNN_FULL_ITEMS`` items.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from scipy import sparse
from torch import nn
from tqdm.auto import tqdm

from training.train import budget_spent

Scorer = Callable[[pd.DataFrame], np.ndarray]  # requests -> [n_requests, n_items] scores
Types = Collection[str]  # event types; a positives dict (type -> weight) stands for its keys
EASE_LAMBDAS = (100.0, 250.0, 500.0, 1000.0, 2000.0)
# EASE inverts a dense items x items matrix: 10,000 items take 0.8 GB and ~30 s on 2 CPU cores
# (20,000: 3.2 GB a copy and ~6 min, and λ tuning inverts six times)
EASE_MAX_ITEMS = 10_000
KNN_FULL_ITEMS = 20_000  # up to this many items ItemKNN keeps every neighbour (exact)
KNN_NEIGHBOURS = 200  # past it, each item's most similar items only
KNN_BLOCK_CELLS = 20_000_000  # items x block columns of the Gram product held dense at once


def positive_events(events: pd.DataFrame, positives: Types, item_ids: list[str]) -> pd.DataFrame:
    """Events of the given types on catalogue items, in time order (then item id, the protocol's tie rule)."""
    pos = events[events["event_type"].isin(list(positives)) & events["item_id"].isin(set(item_ids))]
    return pos.sort_values(["event_timestamp", "item_id"], kind="stable")


def item_types(events: pd.DataFrame) -> tuple[str, ...]:
    """Every behaviour type that names an item (all behaviour, for the recent list and EASE)."""
    return tuple(sorted(events.loc[events["item_id"].notna(), "event_type"].dropna().astype(str).unique()))


def _micros(ts) -> np.ndarray:
    """Times as naive UTC datetime64[us] (comparable with numpy, whatever the input's zone)."""
    return pd.DatetimeIndex(pd.to_datetime(ts, utc=True)).tz_convert(None).to_numpy().astype("datetime64[us]")


class Histories:
    """Each user's events of the given types as catalogue indexes in time order, with a lookup by time."""

    def __init__(self, events: pd.DataFrame, positives: Types, item_ids: list[str]):
        index = {i: k for k, i in enumerate(item_ids)}
        pos = positive_events(events, positives, item_ids)
        ts = _micros(pos["event_timestamp"])
        items = pos["item_id"].map(index).to_numpy(dtype=np.int64)
        codes, users = pd.factorize(pos["user_id"], sort=False)
        order = np.argsort(codes, kind="stable")  # by user, each user's rows still in time order
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, len(order)]
        self._by_user: dict[str, tuple[np.ndarray, np.ndarray]] = {
            user: (ts[order[a:b]], items[order[a:b]]) for user, a, b in zip(users, starts, ends, strict=False)}

    def timed_before(self, user: str, ts: pd.Timestamp) -> tuple[np.ndarray, np.ndarray]:
        """(times, catalogue indexes) of the user's events strictly before ``ts``, oldest first."""
        got = self._by_user.get(user)
        if got is None:
            return np.zeros(0, dtype="datetime64[us]"), np.zeros(0, dtype=np.int64)
        cut = np.searchsorted(got[0], np.datetime64(pd.Timestamp(ts).tz_convert(None).asm8, "us"), side="left")
        return got[0][:cut], got[1][:cut]

    def before(self, user: str, ts: pd.Timestamp) -> np.ndarray:
        """Catalogue indexes of the user's events strictly before ``ts``, oldest first."""
        return self.timed_before(user, ts)[1]

    def sequences(self) -> list[np.ndarray]:
        """Every user's whole history (catalogue indexes, oldest first)."""
        return [items for _, items in self._by_user.values()]

    def sparse(self, requests: pd.DataFrame, n_items: int) -> sparse.csr_matrix:
        """Binary request x item matrix of each request's history (sparse: any catalogue size)."""
        rows = [np.unique(self.before(u, t)) for u, t in
                zip(requests["user_id"], requests["event_timestamp"], strict=True)]
        indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
        cols = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(rows), n_items))

    def matrix(self, requests: pd.DataFrame, n_items: int) -> np.ndarray:
        """Binary request x item matrix of each request's history, dense."""
        return self.sparse(requests, n_items).toarray()


def interaction_matrix(train_events: pd.DataFrame, positives: Types, item_ids: list[str]) -> sparse.csr_matrix:
    """Binary user x item matrix of the training events of the given types (sparse)."""
    index = {i: k for k, i in enumerate(item_ids)}
    pos = positive_events(train_events, positives, item_ids).drop_duplicates(["user_id", "item_id"])
    users, _ = pd.factorize(pos["user_id"])
    return sparse.csr_matrix((np.ones(len(pos), dtype=np.float32), (users, pos["item_id"].map(index).to_numpy())),
                             shape=(int(users.max()) + 1 if len(users) else 0, len(item_ids)))


def popularity_scorer(train_events: pd.DataFrame, positives: Types, item_ids: list[str],
                      count_events: bool = False) -> Scorer:
    """Training counts, the same list for everyone: users per item, or events per item with
    ``count_events`` (repeat purchases count)."""
    if count_events:
        pos = positive_events(train_events, positives, item_ids)
        counts = pos["item_id"].value_counts().reindex(item_ids, fill_value=0).to_numpy(dtype=np.float32)
    else:
        counts = np.asarray(interaction_matrix(train_events, positives, item_ids).sum(axis=0)).ravel()

    def score(requests: pd.DataFrame) -> np.ndarray:
        return np.tile(counts, (len(requests), 1))
    return score


def recent_behaviour_scorer(events: pd.DataFrame, item_ids: list[str], types: Types | None = None) -> Scorer:
    """The user's own items, newest first: an item scores by the time of the user's newest event on it
    before the request (as a dense rank, 1 = oldest time, so equal times tie); untouched items score 0.

    ``types``: the behaviour that counts (default: every type with an item). On shop logs people buy
    what they just viewed, so this list is a strong baseline (``../shared/data/tmall-2014``).
    """
    histories = Histories(events, types if types is not None else item_types(events), item_ids)

    def score(requests: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(requests), len(item_ids)), dtype=np.float32)
        for r, (user, ts) in enumerate(zip(requests["user_id"], requests["event_timestamp"], strict=True)):
            times, items = histories.timed_before(user, ts)
            if len(items):
                np.maximum.at(out[r], items, (np.unique(times, return_inverse=True)[1] + 1).astype(np.float32))
        return out
    return score


def _history_scorer(weights: np.ndarray | sparse.spmatrix, histories: Histories, item_ids: list[str],
                    cols: np.ndarray | None = None) -> Scorer:
    """score = history (binary, before the request) @ an item x item weight matrix; with ``cols`` the
    weights cover those catalogue items only and every other item scores 0."""

    def score(requests: pd.DataFrame) -> np.ndarray:
        x = histories.sparse(requests, len(item_ids))
        if cols is None:
            got = x @ weights
            return (got.toarray() if sparse.issparse(got) else np.asarray(got)).astype(np.float32, copy=False)
        out = np.zeros((len(requests), len(item_ids)), dtype=np.float32)
        out[:, cols] = x[:, cols] @ weights
        return out
    return score


def cosine_neighbours(x: sparse.spmatrix, keep: int | None = None) -> sparse.csr_matrix:
    """Item x item cosine over a binary user x item matrix, zero diagonal, as a sparse matrix whose
    row i holds item i's ``keep`` most similar items (all of them with ``keep=None``).

    Built a block of columns at a time, so the items x items product is never whole in memory.
    """
    x = sparse.csc_matrix(x, dtype=np.float32)
    n = x.shape[1]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel()) + 1e-12
    xt = x.T.tocsr()
    block = max(1, KNN_BLOCK_CELLS // max(n, 1))
    kept = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sim = (xt @ x[:, start:stop]).toarray()  # [n, block]: column j holds item j's similarities
        sim /= norms[:, None] * norms[None, start:stop]
        sim[np.arange(start, stop), np.arange(stop - start)] = 0.0
        if keep is not None and keep < n:
            weakest = np.argpartition(-sim, keep, axis=0)[keep:]
            np.put_along_axis(sim, weakest, 0.0, axis=0)
        kept.append(sparse.csc_matrix(sim))
    full = sparse.hstack(kept, format="csc") if kept else sparse.csc_matrix((n, n), dtype=np.float32)
    return full.T.tocsr()  # cosine is symmetric: column j's neighbours become row j's


def cooccurrence_scorer(train_events: pd.DataFrame, positives: Types, item_ids: list[str],
                        histories: Histories | None = None) -> Scorer:
    """ItemKNN: cosine over the binary user x item matrix; score = sum of similarities to the history
    (past ``KNN_FULL_ITEMS`` items, over each history item's ``KNN_NEIGHBOURS`` nearest only).

    ``histories`` (default: the training events') supplies each request's history.
    """
    x = interaction_matrix(train_events, positives, item_ids)
    keep = KNN_NEIGHBOURS if len(item_ids) > KNN_FULL_ITEMS else None
    return _history_scorer(cosine_neighbours(x, keep), histories or Histories(train_events, positives, item_ids),
                           item_ids)


def ease_weights(x: np.ndarray | sparse.spmatrix, lam: float) -> np.ndarray:
    """EASE's closed form: B = I - P / diag(P) with P = (XᵀX + λI)⁻¹, zero diagonal."""
    p = _inverse_by_users(x, lam) if x.shape[0] < x.shape[1] else _inverse_by_items(x, lam)
    p /= -np.diag(p).copy()  # column j over P_jj
    np.fill_diagonal(p, 0.0)
    return p.astype(np.float32)


def _inverse_by_items(x: np.ndarray | sparse.spmatrix, lam: float) -> np.ndarray:
    """(XᵀX + λI)⁻¹ inverted directly: items x items."""
    gram = x.T @ x
    gram = gram.toarray() if sparse.issparse(gram) else np.asarray(gram)
    gram = gram.astype(np.float64, copy=False)
    gram[np.diag_indices_from(gram)] += lam
    return scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)


def _inverse_by_users(x: np.ndarray | sparse.spmatrix, lam: float) -> np.ndarray:
    """(XᵀX + λI)⁻¹ from the users' side (Woodbury): (I - Xᵀ(XXᵀ + λI)⁻¹X) / λ. The same matrix, with a
    users x users system to solve instead of an items x items inverse (a tuned run inverts six times:
    on 610 users and 9,000 items the id baselines went from 122 s to 84 s, BENCHMARKS.md)."""
    xs = sparse.csr_matrix(x, dtype=np.float64)
    kernel = (xs @ xs.T).toarray()
    kernel[np.diag_indices_from(kernel)] += lam
    solved = scipy.linalg.solve(kernel, xs.toarray(), assume_a="pos", overwrite_a=True, check_finite=False)
    p = -np.asarray(xs.T @ solved)
    p[np.diag_indices_from(p)] += 1.0
    p /= lam
    return p


def popular_columns(x: sparse.spmatrix, limit: int) -> np.ndarray | None:
    """The ``limit`` items with the most users in ``x`` (ascending index), or None when all fit."""
    if x.shape[1] <= limit:
        return None
    users = np.asarray((x > 0).sum(axis=0)).ravel()
    return np.sort(np.argsort(-users, kind="stable")[:limit])


def ease_note(n_items: int) -> str:
    """What the report row says when EASE covers only part of the catalogue."""
    return f"; top {EASE_MAX_ITEMS:,} of {n_items:,} items, the rest score 0" if n_items > EASE_MAX_ITEMS else ""


def ease_scorer(train_events: pd.DataFrame, positives: Types, item_ids: list[str],
                lam: float = EASE_LAMBDAS[0], histories: Histories | None = None) -> Scorer:
    """EASE over the binary user x item matrix of the given types; past ``EASE_MAX_ITEMS`` items only
    the most popular that many are modelled (``ease_note``)."""
    x = interaction_matrix(train_events, positives, item_ids)
    cols = popular_columns(x, EASE_MAX_ITEMS)
    weights = ease_weights(x if cols is None else x[:, cols], lam)
    return _history_scorer(weights, histories or Histories(train_events, positives, item_ids), item_ids, cols)


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
