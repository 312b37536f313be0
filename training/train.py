"""One readable training loop for the profile model (in the spirit of nanoGPT's train.py).

Loss: each positive against the whole catalogue (full softmax; sampled above ``max_softmax_items``),
weighted by its event type. bfloat16 autocast and CUDA when present, gradient accumulation, seeds,
checkpoint and resume, early stopping on validation NDCG@10, and a progress bar with the loss. Where
BERT's top layers train (``ModelConfig.finetune_layers``), they run from cached states on every step.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training import distributed
from training.dataset import ItemCatalogue
from training.encoding import ItemInputs, UserInputs
from training.model import Catalogue, ProfileModel, history_rows


@dataclass
class TrainConfig:
    epochs: int = 40  # at most: early stopping on validation NDCG@10 (or max_seconds) ends it sooner
    batch_size: int = 256
    lr: float = 2e-3
    bert_lr: float = 5e-5  # BERT's trained top layers (``finetune_layers`` > 0): pretrained weights move slowly
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_positives: int | None = 100_000  # per epoch: caps CPU time on big logs
    max_softmax_items: int = 20_000  # above this catalogue size, a sampled softmax
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16/float16 autocast on CUDA only
    patience: int = 3  # epochs without a better validation NDCG@10
    plateau_decay: float = 0.3  # learning rate x this after an epoch without a better validation NDCG@10
    max_seconds: float | None = 240.0  # wall-clock budget per model: a laptop finishes in minutes
    average_decay: float | None = 0.99  # validated and kept: a moving average of the weights (None: the last step)
    checkpoint_dir: str | None = None
    resume: bool = False
    nproc: int = 1  # processes (PyTorch DDP): each takes a share of every batch; see training/distributed.py


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: ProfileModel, examples: pd.DataFrame, catalogue: ItemCatalogue, cfg: TrainConfig,
          validate: Callable[[ProfileModel], float] | None = None, progress: bool = True) -> list[dict]:
    """Train in place, leave the model at its best validation state (in eval mode), and return the
    history: one row per epoch (``epoch, loss, val_ndcg10, lr, validation_seconds``).

    Each positive is a next-item target: a softmax over the whole catalogue as of the positive's time
    (its ``catalogue`` bucket), so a step sees item features from before its own examples only.
    Batches are drawn within one bucket; the item tower runs over the catalogue once per step.
    With ``cfg.nproc`` > 1 this process is rank 0 of a DDP group (``training/distributed.py``): the
    same batches, each split over the processes, the same steps.
    """
    if cfg.nproc > 1 and cfg.resume:
        raise ValueError("a resumed run trains in one process: leave out --nproc")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    data = Positives.build(model, examples, catalogue, device)
    if cfg.nproc <= 1:
        return _loop(model, data, cfg, validate, progress, None)
    dropouts = [_dropout(m) for m in _dropping(model)]
    return distributed.lead(cfg.nproc, device, _rank, (model.cfg, model.spec, model.state_dict(), dropouts, data, cfg),
                            lambda group: _loop(model, data, cfg, validate, progress, group))


def _rank(rank: int, world: int, port: int, model_cfg, spec, state: dict, dropouts: list[float], data: Positives,
          cfg: TrainConfig) -> None:
    """Ranks 1..N-1 (a fresh process each): the same model (weights and dropout rates) and tensors, the
    same loop; rank 0 validates and decides for all."""
    device = distributed.rank_device(pick_device(cfg.device), rank)
    model = ProfileModel.build(model_cfg, spec).to(device)
    model.load_state_dict(state)
    for module, p in zip(_dropping(model), dropouts, strict=True):
        _set_dropout(module, p)
    data.items = {b: inputs.to(device) for b, inputs in data.items.items()}
    group = distributed.join(rank, world, port, device)
    seed_everything(cfg.seed + rank)  # its own dropout masks; the batches come from ``cfg.seed`` on every rank
    try:
        _loop(model, data, cfg, None, False, group)
    finally:
        distributed.leave()


def _dropping(model: nn.Module) -> list[nn.Module]:
    """The modules that drop out at random (their rates are part of the model a rank must mirror)."""
    return [m for m in model.modules() if isinstance(m, nn.Dropout | nn.MultiheadAttention)]


def _dropout(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else module.dropout


def _set_dropout(module: nn.Module, p: float) -> None:
    if isinstance(module, nn.Dropout):
        module.p = p
    else:
        module.dropout = p


def _loop(model: ProfileModel, data: Positives, cfg: TrainConfig, validate: Callable[[ProfileModel], float] | None,
          progress: bool, group: distributed.Group | None) -> list[dict]:
    """The epochs. In a group every rank runs it; rank 0 validates, keeps the best weights, checkpoints,
    and its decisions (a better epoch, stop) reach the others."""
    leader = group is None or group.leader
    step_loss = StepLoss(model, data.index, cfg.max_softmax_items)
    step = group.wrap(step_loss) if group is not None else step_loss
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = WeightAverage(model, cfg.average_decay) if cfg.average_decay else None
    best = BestEpoch(cfg.patience)
    checkpoint = Checkpoint(cfg.checkpoint_dir if leader else None)
    start_epoch, history = checkpoint.resume(model, optimizer, average, best, model.device) if cfg.resume else (0, [])
    rng = np.random.default_rng(cfg.seed)
    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.monotonic()
        batches = _batches(data.buckets, data.lengths, cfg.batch_size, cfg.max_positives, rng)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and leader), leave=False)
        loss, rows = _train_epoch(step, model, data, batches, bar, optimizer, average, cfg, best.score, group)
        trained = time.monotonic()
        improved = False
        if leader:
            with average.applied() if average is not None else contextlib.nullcontext():
                val = validate(model) if validate else None
                improved = best.update(val if val is not None else float(epoch), model)  # no validation: newest wins
            history.append({"epoch": epoch + 1, "loss": loss, "val_ndcg10": val,
                            "lr": optimizer.param_groups[0]["lr"], "validation_seconds": time.monotonic() - trained,
                            "rows_per_process": rows})
            if progress:
                shown = f", validation NDCG@10 {val:.4f}" if val is not None else " (no validation set)"
                tqdm.write(f"epoch {epoch + 1}: loss {loss:.4f}{shown}")
        now = time.monotonic()
        over_budget = leader and budget_spent(now - started, now - epoch_started, cfg.max_seconds)
        done = leader and best.done
        if group is not None:
            improved, done, over_budget = group.decide(improved, done, over_budget)
        if not improved:
            for g in optimizer.param_groups:  # smaller steps from here on
                g["lr"] *= cfg.plateau_decay
        checkpoint.save(epoch, model, optimizer, average, best, history)
        if done:
            break
        if over_budget:
            if progress and leader:
                tqdm.write(f"stopping after epoch {epoch + 1}: another would end past the {cfg.max_seconds:.0f} s "
                           "budget")
            break
    if leader:
        best.restore(model)
    model.eval()
    return history


class StepLoss(nn.Module):
    """One step's loss as a module's forward, so that DDP can wrap it: the batch's weighted
    cross-entropy summed over this process's rows and divided by the whole batch's weight (``total``),
    so the ranks' parts add up to the one-process loss."""

    def __init__(self, model: ProfileModel, index: dict, max_softmax_items: int) -> None:
        super().__init__()
        self.model, self.index, self.max_softmax_items = model, index, max_softmax_items

    def forward(self, users: UserInputs, items: ItemInputs, targets: torch.Tensor, weights: torch.Tensor,
                total: torch.Tensor) -> torch.Tensor:
        return _loss(self.model, users, items, self.index, targets, weights, self.max_softmax_items, total)


@dataclass
class Positives:
    """The positive rows as tensors, built once before the first epoch (BERT runs once per distinct
    text here); every batch selects rows of these."""

    users: UserInputs
    targets: torch.Tensor  # catalogue row of each positive's item
    weights: torch.Tensor  # its event type's weight
    buckets: np.ndarray  # its catalogue as-of bucket
    lengths: np.ndarray  # its history length (batches group similar lengths)
    items: dict[int, ItemInputs]  # each bucket's catalogue, on the device
    index: dict[str, int]  # item id -> catalogue row

    @classmethod
    def build(cls, model: ProfileModel, examples: pd.DataFrame, catalogue: ItemCatalogue,
              device: torch.device, items: dict[int, ItemInputs] | None = None) -> Positives:
        """``items``: the catalogue's buckets as inputs already (a reader of many shards builds them once)."""
        positives = examples[(examples["label"] == 1) & examples["item_id"].isin(catalogue.item_ids)]
        positives = positives.reset_index(drop=True)
        if positives.empty:
            raise ValueError("no positive examples to train on: check the configured positive event types")
        index = {i: k for k, i in enumerate(catalogue.item_ids)}
        targets = torch.tensor(positives["item_id"].map(index).to_numpy(), dtype=torch.long)
        weights = torch.tensor(positives["weight"].to_numpy(), dtype=torch.float32)
        buckets = catalogue.bucket_of(positives["event_timestamp"])
        users = model.user_inputs(positives)
        users.history_rows = history_rows(users.history, index, model.cfg.seq_len)  # the same rows in every bucket
        lengths = (users.history_rows > 0).sum(1).numpy()
        if items is None:
            items = {int(b): model.item_inputs(catalogue.frames[b]).to(device) for b in np.unique(buckets)}
        return cls(users, targets, weights, buckets, lengths, items, index)


def _train_epoch(step: nn.Module, model: ProfileModel, data: Positives, batches: list, bar: tqdm,
                 optimizer: torch.optim.Optimizer, average: WeightAverage | None, cfg: TrainConfig, best: float,
                 group: distributed.Group | None) -> tuple[float, list[int]]:
    """One pass over ``batches`` (``bar`` shows it with the best score so far), with gradient
    accumulation; the mean loss and the rows each process trained on. In a group each rank computes
    its share of every batch (its part of the loss scaled by the group's size, as DDP averages the
    gradients: their sum is the batch's)."""
    model.train()
    device = model.device
    use_amp = cfg.amp and device.type == "cuda"
    world = group.world if group is not None else 1
    parts, mine_total = [], 0
    optimizer.zero_grad()
    for n, (bucket, rows) in enumerate(bar):
        mine, counted = _share(rows, group)
        idx = torch.from_numpy(mine)
        total = data.weights[torch.from_numpy(rows)].sum().to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            part = step(data.users.select(idx).to(device), data.items[bucket], data.targets[idx].to(device),
                        data.weights[idx].to(device), total)
        (part * (world * counted / cfg.grad_accum)).backward()
        if (n + 1) % cfg.grad_accum == 0 or n == len(batches) - 1:
            optimizer.step()
            optimizer.zero_grad()
            if average is not None:
                average.update()
        parts.append(part.item() * counted)
        mine_total += len(mine) if counted else 0
        bar.set_postfix(loss=f"{np.mean(parts[-20:]) * world:.4f}", best=f"{max(best, 0.0):.4f}")
    model.eval()
    if group is None:
        return (float(np.mean(parts)) if parts else float("nan")), [mine_total]
    losses = group.total(parts) if parts else parts  # each batch's whole loss
    rows = group.total([float(mine_total if r == group.rank else 0) for r in range(world)])
    return (float(np.mean(losses)) if losses else float("nan")), [int(r) for r in rows]


def _share(rows: np.ndarray, group: distributed.Group | None) -> tuple[np.ndarray, float]:
    """This rank's rows of a batch, and whether they count: a rank left without a row runs the first one
    with weight 0 (DDP needs every rank in every step)."""
    if group is None:
        return rows, 1.0
    mine = rows[group.rank::group.world]
    return (mine, 1.0) if len(mine) else (rows[:1], 0.0)


class BestEpoch:
    """Early stopping: the best validation score so far, the weights that scored it, and how many
    epochs have passed without beating it."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.score, self.state, self.stale = -1.0, None, 0

    def update(self, score: float, model: nn.Module) -> bool:
        """Keep the model's weights if ``score`` is the best yet; whether it was."""
        if score > self.score:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.score, self.stale = score, 0
            return True
        self.stale += 1
        return False

    @property
    def done(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


class Checkpoint:
    """``checkpoint.pt`` (all a resumed run needs) and ``history.json`` (the curve, for people) in
    ``folder``, rewritten after every epoch; no folder, no checkpoint."""

    def __init__(self, folder: str | None) -> None:
        self.path = Path(folder) / "checkpoint.pt" if folder else None

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None,
               best: BestEpoch, device: torch.device) -> tuple[int, list[dict]]:
        """Restore the saved run into these objects: the next epoch and the history so far."""
        if not (self.path and self.path.exists()):
            return 0, []
        state = torch.load(self.path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best.score, best.stale, best.state = state["best"], state["stale"], state.get("best_state")
        if average is not None and state.get("average") is not None:
            average.load(state["average"])
        return state["epoch"] + 1, state["history"]

    def save(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None,
             best: BestEpoch, history: list[dict]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "best": best.score, "stale": best.stale, "history": history, "best_state": best.state,
                    "average": average.state() if average is not None else None}, self.path)
        (self.path.parent / "history.json").write_text(json.dumps(history, indent=2))


def budget_spent(elapsed: float, last_epoch: float, budget: float | None) -> bool:
    """Whether an epoch as long as the last one would end past ``budget`` (seconds): the budget bounds
    the training time. Stopping only once past it let the crossing epoch run on, and on a slow CPU an
    epoch with its validation is a tenth of Persona's budget and a sixth of a baseline's."""
    return bool(budget) and elapsed + last_epoch > budget


class WeightAverage:
    """An exponential moving average of the trained weights, which validation scores and training keeps.

    The last step's weights depend on the last few batches: two runs whose validation curves agreed to
    the third decimal picked different epochs and moved the test NDCG@10 by 0.006. The average over
    the last hundred or so steps is steadier. Its decay ramps up over the first steps (as TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``), so the random initial weights fade quickly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def state(self) -> dict:
        """What a checkpoint keeps: the averaged weights and the steps taken (the decay's ramp)."""
        return {"shadow": self.shadow, "steps": self.steps}

    def load(self, state: dict) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params, strict=True)]
        self.steps = state["steps"]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)


def _param_groups(model: ProfileModel, cfg: TrainConfig) -> list[dict]:
    """The towers at ``lr``; BERT's trained top layers, if any, at ``bert_lr``."""
    towers = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("bert.")]
    bert = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")]
    return [{"params": towers}] + ([{"params": bert, "lr": cfg.bert_lr}] if bert else [])


def _batches(buckets: np.ndarray, lengths: np.ndarray, size: int, cap: int | None,
             rng: np.random.Generator) -> list:
    """Shuffled batches of positive rows, each from one catalogue bucket and of similar history length
    (a batch is as long as its longest history); at most ``cap`` rows an epoch."""
    order = rng.permutation(len(buckets))[: cap or None]
    out = []
    for b in np.unique(buckets[order]):
        rows = order[buckets[order] == b]
        rows = rows[np.argsort(lengths[rows], kind="stable")]  # stable: random order within a length
        out += [(int(b), rows[s:s + size]) for s in range(0, len(rows), size)]
    return [out[k] for k in rng.permutation(len(out))]


def _loss(model: ProfileModel, users: UserInputs, items: ItemInputs, index: dict, targets: torch.Tensor,
          weights: torch.Tensor, max_softmax_items: int, total: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted cross-entropy of each target against the catalogue (a full softmax while it fits; else
    the targets plus a uniform sample, whose constant logQ correction cancels), divided by ``total``
    (default: these rows' weight)."""
    vectors = model.item_tower(model.with_text_vectors(items))
    user = model.user_tower(model.with_text_vectors(users), Catalogue(index, vectors))
    if len(vectors) > max_softmax_items:
        sample = torch.randint(0, len(vectors), (max_softmax_items,), device=vectors.device)
        candidates = torch.cat([targets, sample])
        logits = model.score(user, vectors[candidates])
        same = targets[:, None] == candidates[None, :]  # other copies of the target are not negatives
        same[torch.arange(len(targets)), torch.arange(len(targets))] = False
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
        ce = nn.functional.cross_entropy(logits.float(), torch.arange(len(targets), device=logits.device),
                                         reduction="none")
    else:
        ce = nn.functional.cross_entropy(model.score(user, vectors).float(), targets, reduction="none")
    return (ce * weights).sum() / (weights.sum() if total is None else total)


def config_dict(cfg: TrainConfig) -> dict:
    """The settings as plain values (a stored model's ``train_config`` metadata)."""
    return asdict(cfg)
