"""The profile model trained from a training set's Parquet shards (``persona train --training-set DIR``):
one shard in memory at a time, in one process or in a PyTorch DDP group where each rank reads its own
shards (rank r takes shards r, r + N, ...).

Why an epoch count and a held-out share here, not the time budget and the log's validation requests:
the evaluation protocol reads the whole log (each request's history, the split), which this path never
holds, and a fixed time budget would see a tenth of a log ten times larger. So every epoch passes over
every shard once, up to ``--epochs``; a small share of the positives, chosen by a hash of their example
id (so the same rows in every epoch and on every rank count), is never trained on, and its loss after
each epoch lowers the learning rate, stops training after ``patience`` epochs without a better one, and
picks the epoch whose weights are kept.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from core.privacy import id_hash
from training import distributed
from training.dataset import ItemCatalogue
from training.encoding import ItemInputs
from training.evaluate import ranking_metrics, summarise
from training.model import Catalogue, ProfileModel, resolve_finetune
from training.shard_baselines import baseline_rows, trained_interactions
from training.spark_training_set import TrainingShards
from training.train import (
    BestEpoch,
    Positives,
    StepLoss,
    TrainConfig,
    WeightAverage,
    _batches,
    _dropout,
    _dropping,
    _loss,
    _param_groups,
    _set_dropout,
    pick_device,
    seed_everything,
)
from training.workflow import Stages, feature_spec

SAMPLE_ROWS = 50_000  # rows the feature statistics and vocabularies are fitted on (a uniform sample)
HELD_OUT_SHARE = 0.05  # of the positives, for the stopping rule ...
HELD_OUT_ROWS = 20_000  # ... and at most this many of them, whatever the log's size
TIME_SAMPLE = 100_000  # positive times kept for the catalogue's as-of buckets (their quantiles)
SHARDS_PER_PROCESS = 4  # fewer shards than this per process: the ranks split every shard's rows instead
MIN_POSITIVES_PER_PROCESS = 100  # below this a process could be left without a batch: one process trains
TEXT_CACHE_TEXTS = 200_000  # BERT vectors kept per process (~300 MB): the texts of a big log do not fit

Keep = Callable[[pd.Series], np.ndarray]  # user ids -> which rows may train (erased users may not)


@dataclass(frozen=True)
class WithoutErased:
    """A ``Keep``: not the rows of a user whose salted hash has a tombstone (erased after the set was
    written). Plain data, so each training process gets its own copy."""

    salt: bytes
    erased: frozenset[str]

    def __call__(self, users: pd.Series) -> np.ndarray:
        gone = {u for u in users.unique() if id_hash(u, self.salt) in self.erased}
        return ~users.isin(gone).to_numpy()


def agreed(keep: Keep | None) -> Keep | None:
    """Under a launcher each process read the tombstones when it started: a forget between two pods'
    starts would have them leave out different rows and plan different epochs. Every process takes the
    union instead (a user erased for one is erased for all). Needs the group joined; a ``Keep`` other
    than ``WithoutErased`` is the caller's rule, the same in every process."""
    if keep is not None and not isinstance(keep, WithoutErased):
        return keep
    found = [k for k in distributed.gathered(keep) if k is not None]
    if not found:
        return None
    if len({k.salt for k in found}) > 1:
        raise ValueError("the processes hash user ids with different salts: start them on the same workspace")
    return WithoutErased(found[0].salt, frozenset().union(*(k.erased for k in found)))


@dataclass
class Survey:
    """What one pass over the shards tells before training: sizes, the positives' items and users, a
    sample to fit the feature statistics on, and the positives' times for the catalogue's buckets."""

    rows: int = 0
    positives: int = 0
    dropped: int = 0  # rows of users who may not train (erased after the set was written)
    item_ids: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    sample: list[pd.DataFrame] = field(default_factory=list)
    times: list[pd.Series] = field(default_factory=list)
    per_shard: list[int] = field(default_factory=list)  # positives in each shard, in the shards' order

    @property
    def held_out_share(self) -> float:
        return min(HELD_OUT_SHARE, HELD_OUT_ROWS / max(1, self.positives))

    def sample_frame(self) -> pd.DataFrame:
        return pd.concat(self.sample, ignore_index=True)

    def position_times(self) -> pd.Series:
        """Positive times for ``ItemCatalogue``: a sample, with the earliest so every row has a bucket."""
        times = pd.concat(self.times, ignore_index=True)
        return pd.concat([times, pd.Series([self.first])], ignore_index=True)


def survey(shards: TrainingShards, keep: Keep | None = None, seed: int = 0,
           progress: bool = True) -> Survey:
    """One pass over the shards, a shard in memory at a time."""
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards.paths)
    if not total:
        raise ValueError(f"the training set in {shards.folder} has no rows: run `persona training-set`")
    fraction = min(1.0, SAMPLE_ROWS / total)
    out, rng = Survey(), np.random.default_rng(seed)
    for path in tqdm(shards.paths, desc="training set: survey", disable=not progress, leave=False):
        frame = shards.read(path)
        if keep is not None:
            allowed = keep(frame["user_id"].astype(str))
            out.dropped += int((~allowed).sum())
            frame = frame[allowed]
        positives = frame[frame["label"] == 1]
        out.per_shard.append(len(positives))
        out.rows += len(frame)
        out.positives += len(positives)
        out.item_ids.update(positives["item_id"].dropna().astype(str))
        out.users.update(frame["user_id"].astype(str))
        if len(frame):
            first, last = frame["event_timestamp"].min(), frame["event_timestamp"].max()
            out.first = first if out.first is None else min(out.first, first)
            out.last = last if out.last is None else max(out.last, last)
        out.sample.append(frame[rng.random(len(frame)) < fraction])
        times = positives["event_timestamp"]
        out.times.append(times[rng.random(len(times)) < min(1.0, TIME_SAMPLE / total)])
    if not out.positives:
        raise ValueError("no positive examples to train on: check the configured positive event types")
    return out


def held_out(example_ids: pd.Series, share: float) -> np.ndarray:
    """Whether each row is in the held-out share: a hash of its example id, the same on every read."""
    hashed = pd.util.hash_array(example_ids.to_numpy(dtype=np.int64)) % 1_000_000
    return hashed < share * 1_000_000


@dataclass
class Plan:
    """What every rank is handed: the shards, the catalogue, the held-out share and the user filter."""

    shards: TrainingShards
    catalogue: ItemCatalogue
    held_out_share: float
    keep: Keep | None = None
    positives: list[int] | None = None  # each shard's positives (``Survey.per_shard``); else its rows

    def split_rows(self, world: int) -> bool:
        """Every rank reads every shard and keeps its rows: too few shards to share out evenly, or a rank
        would be left without a positive."""
        if world == 1:
            return False
        if len(self.shards) < SHARDS_PER_PROCESS * world:
            return True
        owners = self._owners(world)
        return any(sum(w for w, r in zip(self._weights(), owners, strict=True) if r == rank) == 0
                   for rank in range(world))

    def mine(self, rank: int, world: int) -> list:
        """This rank's shards: whole shards, the biggest first to the rank with the least so far."""
        if world == 1 or self.split_rows(world):
            return list(self.shards.paths)
        return [p for p, r in zip(self.shards.paths, self._owners(world), strict=True) if r == rank]

    def _weights(self) -> list[int]:
        return self.positives or [pq.ParquetFile(p).metadata.num_rows for p in self.shards.paths]

    def _owners(self, world: int) -> list[int]:
        weights, loads = self._weights(), [0] * world
        owners = [0] * len(weights)
        for k in sorted(range(len(weights)), key=lambda k: (-weights[k], k)):
            owners[k] = min(range(world), key=lambda r: (loads[r], r))
            loads[owners[k]] += weights[k]
        return owners

    def trainable(self, frame: pd.DataFrame, rank: int = 0, world: int = 1) -> np.ndarray:
        """Which rows of a shard this rank learns from (held-out ones included): positives of catalogue
        items, of users who may train, its share of them when the ranks split the rows. Taken before the
        on-demand views run, which then run on these rows only."""
        mask = (frame["label"] == 1).to_numpy() & frame["item_id"].isin(self.catalogue.item_ids).to_numpy()
        if self.split_rows(world):
            mask &= pd.util.hash_array(frame["example_id"].to_numpy(dtype=np.int64)) % world == rank
        if self.keep is not None:
            mask &= self.keep(frame["user_id"].astype(str))
        return mask


def fit(model: ProfileModel, plan: Plan, cfg: TrainConfig, progress: bool = True,
        group: distributed.Group | None = None) -> list[dict]:
    """Train in place, streaming the shards (``cfg.nproc`` processes: each its own shards, DDP averaging
    the gradients), and leave the model at the epoch with the lowest held-out loss, in eval mode. Returns
    the history: one row per epoch. Under a launcher, ``group`` is its group if already joined."""
    if cfg.resume:
        raise ValueError("a training set is not resumed: train it again")
    launch = _launch(cfg)
    world = launch[1] if launch else cfg.nproc
    total = sum(plan.positives) if plan.positives is not None else None
    if world > 1 and total is not None and total < MIN_POSITIVES_PER_PROCESS * world:
        if progress:
            tqdm.write(f"{total} positives: too few to share out over {world} processes; training in one")
        if launch and launch[0] > 0:
            return []  # every process surveys the same shards: all decide alike, and rank 0 trains alone
        cfg, launch = replace(cfg, nproc=1), None
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if launch:
        device = distributed.rank_device(device, launch[0])
    model.to(device)
    bound = model.text_cache_size
    model.text_cache_size = min(bound or TEXT_CACHE_TEXTS, TEXT_CACHE_TEXTS)
    try:
        if launch:
            return _fit_launched(model, plan, cfg, progress, device, group)
        return _fit(model, plan, cfg, progress, device)
    finally:
        model.text_cache_size = bound


def _fit(model: ProfileModel, plan: Plan, cfg: TrainConfig, progress: bool, device: torch.device) -> list[dict]:
    items = _catalogue_inputs(model, plan, device, progress)  # once, here: BERT, shared with the ranks
    if cfg.nproc <= 1:
        return _loop(model, plan, cfg, progress, None, items)
    dropouts = [_dropout(m) for m in _dropping(model)]
    return distributed.lead(cfg.nproc, device, _rank,
                            (model.cfg, model.spec, model.state_dict(), dropouts, plan, cfg, items),
                            lambda group: _loop(model, plan, cfg, progress, group, items))


def _catalogue_inputs(model: ProfileModel, plan: Plan, device: torch.device, progress: bool) -> dict[int, ItemInputs]:
    """The item tower's inputs for the catalogue as of each time bucket (BERT over its texts)."""
    return {b: model.item_inputs(frame).to(device)
            for b, frame in enumerate(tqdm(plan.catalogue.frames, desc="catalogue as of each bucket",
                                           disable=not progress, leave=False))}


def _fit_launched(model: ProfileModel, plan: Plan, cfg: TrainConfig, progress: bool,
                  device: torch.device, group: distributed.Group | None) -> list[dict]:
    """One of the processes a launcher started (``distributed.launched``): each built the same model from
    the same seed and the catalogue's inputs from the same store (DDP starts every rank from rank 0's
    weights all the same), joins the group (unless joined), and trains on its own shards; rank 0 reports
    and decides."""
    items = _catalogue_inputs(model, plan, device, progress)
    with contextlib.nullcontext(group) if group else _launched_group(cfg) as joined:
        if joined.rank:
            seed_everything(cfg.seed + joined.rank)  # its own dropout masks, as a spawned rank's
        return _loop(model, plan, cfg, progress and joined.leader, joined, items)


def _rank(rank: int, world: int, port: int, model_cfg, spec, state: dict, dropouts: list[float], plan: Plan,
          cfg: TrainConfig, items: dict[int, ItemInputs]) -> None:
    """Ranks 1..N-1: the same model, their own shards."""
    device = distributed.rank_device(pick_device(cfg.device), rank)
    model = ProfileModel.build(model_cfg, spec).to(device)
    model.load_state_dict(state)
    model.text_cache_size = TEXT_CACHE_TEXTS
    for module, p in zip(_dropping(model), dropouts, strict=True):
        _set_dropout(module, p)
    group = distributed.join(rank, world, port, device)
    seed_everything(cfg.seed + rank)
    try:
        _loop(model, plan, cfg, False, group, {b: x.to(device) for b, x in items.items()})
    finally:
        distributed.leave()


class HeldOut:
    """This rank's held-out positives (gathered on the first pass) and their loss."""

    def __init__(self) -> None:
        self.parts: list[Positives] = []

    def __len__(self) -> int:
        return sum(len(p.targets) for p in self.parts)

    @torch.no_grad()
    def loss(self, model: ProfileModel, items: dict[int, ItemInputs], cfg: TrainConfig) -> tuple[float, float]:
        """(weighted loss sum, weight sum) over the rows; a sampled softmax draws the same sample each time."""
        total, weight = 0.0, 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for part in self.parts:
                for bucket in np.unique(part.buckets):
                    rows = np.flatnonzero(part.buckets == bucket)
                    for s in range(0, len(rows), cfg.batch_size):
                        idx = torch.from_numpy(rows[s:s + cfg.batch_size])
                        w = part.weights[idx]
                        mean = _loss(model, part.users.select(idx).to(model.device), items[int(bucket)], part.index,
                                     part.targets[idx].to(model.device), w.to(model.device), cfg.max_softmax_items)
                        total += float(mean) * float(w.sum())
                        weight += float(w.sum())
        return total, weight


def _positives(model: ProfileModel, frame: pd.DataFrame, plan: Plan, items: dict[int, ItemInputs],
               device: torch.device) -> Positives | None:
    frame = frame[(frame["label"] == 1) & frame["item_id"].isin(plan.catalogue.item_ids)]
    return Positives.build(model, frame, plan.catalogue, device, items) if len(frame) else None


def _shard_batches(model: ProfileModel, plan: Plan, paths: list, items: dict[int, ItemInputs], size: int,
                   rng: np.random.Generator, held: HeldOut | None, device: torch.device,
                   group: distributed.Group | None) -> Iterator[tuple]:
    """(positives, bucket, rows) for every batch of this rank's shards, one shard read at a time, in a
    shuffled order; the held-out rows go to ``held`` (first epoch) and never into a batch."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    for k in rng.permutation(len(paths)):
        frame = plan.shards.read(paths[k], lambda f: plan.trainable(f, rank, world))
        out = held_out(frame["example_id"], plan.held_out_share)
        if held is not None:
            part = _positives(model, frame[out], plan, items, device)
            if part is not None:
                held.parts.append(part)
        data = _positives(model, frame[~out], plan, items, device)
        if data is None:
            continue
        for bucket, rows in _batches(data.buckets, data.lengths, size, None, rng):
            yield data, bucket, rows


def _loop(model: ProfileModel, plan: Plan, cfg: TrainConfig, progress: bool,
          group: distributed.Group | None, items: dict[int, ItemInputs]) -> list[dict]:
    """The epochs. Each rank takes ``batch_size`` of its own rows a step, so a step of N ranks learns from
    N batches and an epoch takes 1/N of the steps (as DDP usually runs): a step's fixed cost, the item
    tower over the whole catalogue for the softmax, is paid once per N batches. (Sharing each batch out
    instead, as ``training/train.py`` does, left that cost whole on every rank: two processes ran an
    epoch 1.6 × slower than one.) Every rank steps together: a rank whose shards are done runs its last
    batch with weight 0 until every rank is done (DDP needs each rank in each step), and the others'
    gradients are scaled so a step is the mean over the ranks that had a batch."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    leader = rank == 0
    device = model.device
    index = {i: k for k, i in enumerate(plan.catalogue.item_ids)}
    step_loss = StepLoss(model, index, cfg.max_softmax_items)
    step = group.wrap(step_loss) if group is not None else step_loss
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = WeightAverage(model, cfg.average_decay) if cfg.average_decay else None
    best = BestEpoch(cfg.patience)
    best.score = float("-inf")  # scores here are minus a loss: below BestEpoch's floor for NDCG
    rng = np.random.default_rng(cfg.seed + rank)
    use_amp = cfg.amp and device.type == "cuda"
    paths, held, history = plan.mine(rank, world), HeldOut(), []
    for epoch in range(cfg.epochs):
        started = time.monotonic()
        batches = _shard_batches(model, plan, paths, items, cfg.batch_size, rng,
                                 held if epoch == 0 else None, device, group)
        bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not (progress and leader),
                   leave=False)
        losses, rows, steps, last = [], 0, 0, None
        model.train()
        optimizer.zero_grad()
        while True:
            batch = next(batches, None)
            active = int(group.total([float(batch is not None)])[0]) if group is not None else int(batch is not None)
            if not active:
                break
            data, bucket, idx = batch if batch is not None else last
            last = (data, bucket, idx)
            select = torch.from_numpy(idx)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                part = step(data.users.select(select).to(device), items[bucket], data.targets[select].to(device),
                            data.weights[select].to(device), None)
            scale = world / active if batch is not None else 0.0
            (part * (scale / cfg.grad_accum)).backward()
            steps += 1
            if steps % cfg.grad_accum == 0:
                optimizer.step()
                optimizer.zero_grad()
                if average is not None:
                    average.update()
            if batch is not None:
                losses.append(part.item())
                rows += len(idx)
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]) if losses else float('nan'):.4f}")
        bar.close()
        if steps % cfg.grad_accum:
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with average.applied() if average is not None else contextlib.nullcontext():
            own = held.loss(model, items, cfg)
        totals = [own[0], own[1], float(np.sum(losses)), float(len(losses)), float(len(held))]
        per_rank = [float(rows if r == rank else 0) for r in range(world)]
        if group is not None:  # every rank's figures, summed (each rank calls this: a collective)
            totals, per_rank = group.total(totals), group.total(per_rank)
        (loss_sum, weight, train_sum, count, held_rows), per_rank = totals, [int(r) for r in per_rank]
        val = loss_sum / weight if weight else None
        improved = False
        if leader:
            with average.applied() if average is not None else contextlib.nullcontext():
                improved = best.update(-val if val is not None else float(epoch), model)
            history.append({"epoch": epoch + 1, "loss": train_sum / count if count else float("nan"),
                            "held_out_loss": val, "held_out_rows": int(held_rows),
                            "lr": optimizer.param_groups[0]["lr"], "rows_per_process": per_rank,
                            "shards_per_process": [len(plan.mine(r, world)) for r in range(world)],
                            "seconds": time.monotonic() - started})
            if progress:
                shown = f", held-out loss {val:.4f}" if val is not None else ""
                tqdm.write(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}{shown}")
        done = leader and best.done
        if group is not None:
            improved, done = group.decide(improved, done)
        if not improved:
            for g in optimizer.param_groups:
                g["lr"] *= cfg.plateau_decay
        if done:
            break
    if leader:
        best.restore(model)
    model.eval()
    return history



def bucket_popularity(shards: TrainingShards, catalogue: ItemCatalogue, keep: Keep | None = None) -> np.ndarray:
    """[bucket, item]: the positives of each item before each catalogue bucket's start, so a held-out
    request ranked with its bucket sees only counts from before its own time. Reads four columns."""
    index = pd.Series(np.arange(len(catalogue.item_ids)), index=pd.Index(catalogue.item_ids))
    starts = np.array([s.tz_convert(None).to_datetime64() for s in catalogue.starts], dtype="datetime64[us]")
    counts = np.zeros((len(starts), len(index)), dtype=np.float64)
    for path in shards.paths:
        frame = pq.read_table(path, columns=["user_id", "item_id", "label", "event_timestamp"]).to_pandas()
        frame = frame[frame["label"] == 1]
        if keep is not None:
            frame = frame[keep(frame["user_id"].astype(str))]
        col = frame["item_id"].astype(str).map(index)
        times = pd.to_datetime(frame["event_timestamp"], utc=True).dt.tz_convert(None).to_numpy()
        first = np.searchsorted(starts, times.astype("datetime64[us]"), side="right")  # buckets starting later
        ok = col.notna().to_numpy() & (first < len(starts))
        np.add.at(counts, (first[ok], col.to_numpy()[ok].astype(np.int64)), 1.0)
    return np.cumsum(counts, axis=0)


SCORE_CELLS = 20_000_000  # scores held at once while ranking held-out rows against the catalogue


def _engaged_before(frame: pd.DataFrame, engaged: Collection[str], index: dict[str, int]) -> list[np.ndarray]:
    """Each row's engaged items in its sequence (the user's last events before the row): excluded."""
    out = []
    for items, kinds in zip(frame["sequence_items"], frame["sequence_types"], strict=True):
        pairs = zip(json.loads(items), json.loads(kinds), strict=True) if items else ()
        out.append(np.unique([index[i] for i, k in pairs if k in engaged and i in index]).astype(np.int64))
    return out


@torch.no_grad()
def held_out_ranking(model: ProfileModel, plan: Plan, popularity: np.ndarray, engaged: Collection[str],
                     progress: bool = True) -> pd.DataFrame:
    """NDCG@10 and the rest on the held-out positives (never trained on): the model against popularity as
    of each row's catalogue bucket and the id baselines (``training/shard_baselines.py``: ItemKNN and
    EASE fitted on the trained-on positives), the whole catalogue ranked, ties counted half, the user's
    engaged items in their sequence excluded (a target among them is a miss, as in the protocol). One
    more pass over the shards, in this process, and one over four of their columns for the baselines."""
    model.eval()
    index = {i: k for k, i in enumerate(plan.catalogue.item_ids)}
    inputs = {b: model.item_inputs(frame).to(model.device) for b, frame in enumerate(plan.catalogue.frames)}
    vectors = {b: model.item_tower(model.with_text_vectors(x)) for b, x in inputs.items()}
    chunk = max(1, min(256, SCORE_CELLS // max(1, len(index))))
    found: dict[str, list] = {"Persona (profile model)": [], "popularity (as of the request's bucket)": []}
    tops: dict[str, list] = {name: [] for name in found}
    targets, left_out = [], []  # every held-out row's, for the id baselines
    for path in tqdm(plan.shards.paths, desc="held-out ranking", disable=not progress, leave=False):
        frame = plan.shards.read(path, lambda f: plan.trainable(f) & held_out(f["example_id"], plan.held_out_share))
        if frame.empty:
            continue
        part = Positives.build(model, frame, plan.catalogue, model.device, inputs)
        excluded = _engaged_before(frame, set(engaged), index)
        for bucket in np.unique(part.buckets):
            rows = np.flatnonzero(part.buckets == bucket)
            for s in range(0, len(rows), chunk):
                idx = rows[s:s + chunk]
                users = model.with_text_vectors(part.users.select(torch.from_numpy(idx)).to(model.device))
                user = model.user_tower(users, Catalogue(index, vectors[int(bucket)]))
                scores = {"Persona (profile model)": model.score(user, vectors[int(bucket)]).float().cpu().numpy(),
                          "popularity (as of the request's bucket)": np.broadcast_to(
                              popularity[int(bucket)], (len(idx), popularity.shape[1]))}
                for name, values in scores.items():
                    got = ranking_metrics(values, part.targets[idx].numpy(), [excluded[r] for r in idx])
                    found[name].append(got["rank"])
                    tops[name].append(got["top10"])
                targets.append(part.targets[idx].numpy())
                left_out += [excluded[r] for r in idx]
    rows = [{"model": name, **summarise(np.concatenate(found[name]), np.concatenate(tops[name]), len(index))}
            for name in found if found[name]]
    if targets:
        def trained(frame: pd.DataFrame) -> np.ndarray:
            return plan.trainable(frame) & ~held_out(frame["example_id"], plan.held_out_share)
        rows += baseline_rows(trained_interactions(plan.shards.paths, index, trained), np.concatenate(targets),
                              left_out)
    return pd.DataFrame(rows)


@dataclass
class ShardRun:
    """A trained model and what the CLI records of it."""

    model: ProfileModel
    survey: Survey
    history: list[dict]
    report: object  # the report's path
    seconds: dict[str, float]
    metrics: pd.DataFrame  # held-out ranking: the model against popularity
    leader: bool = True  # false on a launcher's ranks other than 0: they train, rank 0 keeps the model


def train_from_shards(store, shards: TrainingShards, item_ids: list[str], model_cfg, cfg: TrainConfig,
                      report_dir, keep: Keep | None = None, progress: bool = True,
                      engaged: Collection[str] = ()) -> ShardRun:
    """``persona train --training-set``: survey the shards, fit the feature spec on a sample of them (the
    item-id vocabulary on every positive), take the catalogue's features as of the positives' times,
    train (``fit``), and rank the held-out positives (``held_out_ranking``; ``engaged``: the event types
    whose items a ranking leaves out). ``item_ids``: the catalogue the softmax ranks.

    Started by a launcher (``distributed.launched``), every process runs this; the ranks other than 0
    train and return (``ShardRun.leader`` false) without a ranking or a report."""
    if _launch(cfg):
        with _launched_group(cfg) as group:
            return _train_from_shards(store, shards, item_ids, model_cfg, cfg, report_dir, agreed(keep), progress,
                                      engaged, group)
    return _train_from_shards(store, shards, item_ids, model_cfg, cfg, report_dir, keep, progress, engaged)


def _launch(cfg: TrainConfig) -> tuple[int, int] | None:
    """(rank, world) under a launcher (``distributed.launched``), refusing ``--nproc`` there before any
    process waits for the others."""
    launch = distributed.launched()
    if launch and cfg.nproc > 1:
        raise ValueError(f"started by a launcher as one of {launch[1]} processes: its options set the processes, "
                         "leave out --nproc")
    return launch


@contextlib.contextmanager
def _launched_group(cfg: TrainConfig) -> Iterator[distributed.Group]:
    """The launcher's group, joined before the survey (the processes agree on what they leave out first),
    left at the end, with this process's thread count restored."""
    threads = torch.get_num_threads()
    launch = distributed.launched()
    group = distributed.join_launched(distributed.rank_device(pick_device(cfg.device), launch[0]))
    try:
        yield group
    finally:
        distributed.leave()
        torch.set_num_threads(threads)


def _train_from_shards(store, shards: TrainingShards, item_ids: list[str], model_cfg, cfg: TrainConfig, report_dir,
                       keep: Keep | None, progress: bool, engaged: Collection[str],
                       group: distributed.Group | None = None) -> ShardRun:
    leader = group is None or group.leader
    progress = progress and leader
    world = group.world if group else cfg.nproc
    stage = Stages(progress)
    with stage("survey of the shards"):
        found = survey(shards, keep, cfg.seed, progress)
    with stage("feature spec and the catalogue as of the positives' times"):
        spec = feature_spec(store, found.sample_frame())
        spec.item_ids = sorted(found.item_ids)
        catalogue = ItemCatalogue(store, item_ids, found.position_times())
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = ProfileModel.build(resolve_finetune(model_cfg, device, len(item_ids)), spec).to(device)
    plan = Plan(shards, catalogue, found.held_out_share, keep, found.per_shard)
    with stage(f"train ({world} process{'es' if world > 1 else ''})"):
        history = fit(model, plan, cfg, progress, group)
    if not leader:
        return ShardRun(model, found, history, None, stage.seconds, pd.DataFrame(), leader=False)
    with stage("held-out ranking (the model, popularity, ItemKNN, EASE)"):
        metrics = held_out_ranking(model, plan, bucket_popularity(shards, catalogue, keep), engaged, progress)
    report = write_shard_report(report_dir, shards, found, history, stage.seconds, metrics)
    return ShardRun(model, found, history, report, stage.seconds, metrics)


def write_shard_report(folder, shards: TrainingShards, found: Survey, history: list[dict],
                       seconds: dict[str, float], metrics: pd.DataFrame | None = None):
    """report.md and training_curve.png: the set, the epochs, the held-out loss, where the time went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(history)
    table.to_csv(folder / "history.csv", index=False)
    if metrics is not None:
        metrics.to_csv(folder / "metrics.csv", index=False)
    (folder / "stages.json").write_text(json.dumps({k: round(v, 1) for k, v in seconds.items()}, indent=2))
    md = ["# Persona: the profile model trained from a training set", "",
          f"Training set: `{shards.folder}`, {len(shards)} shards, {found.rows:,} rows, {found.positives:,} "
          f"positives, {len(found.users):,} users, from {found.first} to {found.last}."
          + (f" {found.dropped:,} rows of erased users were left out." if found.dropped else ""), "",
          "Training stops on the loss of a held-out share of the positives "
          f"({found.held_out_share:.2%}, chosen by example id, never trained on), and the weights of the epoch "
          "with the lowest one are kept.", "",
          "## Held-out ranking", "",
          "The held-out positives ranked against the whole catalogue as of their time (ties count half), "
          "with the items the user engaged with in their sequence (their last events) left out; a target "
          "among those is a miss. ItemKNN and EASE are fitted on the positives trained on and score each row "
          "from those same engaged items; EASE's λ is the best on these rows (its best case). Not the "
          "protocol of `persona evaluate` (each user's last interaction, the full history excluded, the "
          "tuned baselines): that reads the log, which this path never holds. "
          "Repeat engagements are targets here too, so the figures sit below the protocol's.", "",
          metrics.to_markdown(index=False, floatfmt=".4f") if metrics is not None and len(metrics) else
          "(no held-out positive)", "",
          "## Epochs", "",
          table.drop(columns=["rows_per_process", "shards_per_process"], errors="ignore")
          .to_markdown(index=False, floatfmt=".4f"), "",
          "## Where the time went", "",
          pd.DataFrame({"stage": list(seconds), "seconds": list(seconds.values())}).to_markdown(
              index=False, floatfmt=".1f"), "", "![training curve](training_curve.png)", ""]
    (folder / "report.md").write_text("\n".join(md))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table["epoch"], table["loss"], marker="o", label="training loss")
    ax.plot(table["epoch"], table["held_out_loss"].astype(float), marker="o", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "training_curve.png", dpi=110)
    plt.close(fig)
    return folder / "report.md"
