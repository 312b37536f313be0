"""One readable training loop for the profile model (in the spirit of nanoGPT's train.py).

Loss: in-batch sampled softmax over the positives' items with logQ correction (item frequency
among positives), plus BCE on the explicit negatives (exposures and time-aware samples). AMP and
CUDA when present, gradient accumulation, seeds, checkpoint and resume, early stopping on
validation NDCG@10, and a progress bar with the loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training.model import ProfileModel


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3  # towers
    bert_lr: float = 3e-5  # the fine-tuned BERT layers
    weight_decay: float = 0.01
    grad_accum: int = 1
    bce_weight: float = 0.5
    max_positives: int | None = 20_000  # per epoch: caps CPU time on big logs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16/float16 autocast on CUDA only
    patience: int = 2  # epochs without a better validation NDCG@10
    checkpoint_dir: str | None = None
    resume: bool = False
    history: list[dict] = field(default_factory=list)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: ProfileModel, examples: pd.DataFrame, cfg: TrainConfig,
          validate: Callable[[ProfileModel], float] | None = None, progress: bool = True) -> ProfileModel:
    """Train in place; returns the model restored to its best validation state."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    positives = examples[examples["label"] == 1].reset_index(drop=True)
    negatives = examples[examples["label"] == 0].reset_index(drop=True)
    if positives.empty:
        raise ValueError("no positive examples to train on: check the configured positive event types")
    freq = positives["item_id"].value_counts(normalize=True)
    bert_params = [p for n, p in model.named_parameters() if n.startswith("bert.") and p.requires_grad]
    tower_params = [p for n, p in model.named_parameters() if not n.startswith("bert.") and p.requires_grad]
    groups = [{"params": tower_params, "lr": cfg.lr}]
    if bert_params:
        groups.append({"params": bert_params, "lr": cfg.bert_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ckpt = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
    start_epoch, best, best_state, stale = 0, -1.0, None, 0
    if cfg.resume and ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, stale, cfg.history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
        best_state = state.get("best_state")
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = rng.permutation(len(positives))[: cfg.max_positives or None]
        steps = range(0, len(order), cfg.batch_size)
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        losses = []
        optimizer.zero_grad()
        for step, start in enumerate(bar):
            batch = positives.iloc[order[start:start + cfg.batch_size]]
            neg = negatives.iloc[rng.integers(0, len(negatives), len(batch))] if len(negatives) else None
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = _loss(model, batch, neg, freq, cfg.bce_weight)
            scaler.scale(loss / cfg.grad_accum).backward()
            if (step + 1) % cfg.grad_accum == 0 or step == len(steps) - 1:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        model.eval()
        val = validate(model) if validate else None
        cfg.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_ndcg10": val})
        if progress:
            shown = f", validation NDCG@10 {val:.4f}" if val is not None else " (no validation set)"
            tqdm.write(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}{shown}")
        score = val if val is not None else float(epoch)  # without validation the newest epoch wins
        if score > best:
            best, stale = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "best": best, "stale": stale, "history": cfg.history, "best_state": best_state}, ckpt)
            (ckpt.parent / "history.json").write_text(json.dumps(cfg.history, indent=2))
        if stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


def _loss(model: ProfileModel, batch: pd.DataFrame, neg: pd.DataFrame | None, freq: pd.Series,
          bce_weight: float) -> torch.Tensor:
    device = model.device
    users = model.user_vectors(batch)
    items = model.item_vectors(batch)
    logits = model.score(users, items)
    log_q = torch.tensor(np.log(batch["item_id"].map(freq).fillna(1e-6).to_numpy()), device=device,
                         dtype=logits.dtype)
    logits = logits - log_q[None, :]  # logQ correction: popular items are over-sampled negatives
    same = torch.tensor(batch["item_id"].to_numpy()[:, None] == batch["item_id"].to_numpy()[None, :],
                        device=device)
    eye = torch.eye(len(batch), dtype=torch.bool, device=device)
    logits = logits.masked_fill(same & ~eye, torch.finfo(logits.dtype).min)  # no in-batch false negatives
    weights = torch.tensor(batch["weight"].to_numpy(), device=device, dtype=logits.dtype)
    ce = nn.functional.cross_entropy(logits, torch.arange(len(batch), device=device), reduction="none")
    loss = (ce * weights).sum() / weights.sum()
    if neg is not None and bce_weight > 0:
        neg_scores = (model.user_vectors(neg) * model.item_vectors(neg)).sum(-1) / model.cfg.temperature
        pos_scores = (users * items).sum(-1) / model.cfg.temperature
        scores = torch.cat([pos_scores, neg_scores])
        labels = torch.cat([torch.ones_like(pos_scores), torch.zeros_like(neg_scores)])
        loss = loss + bce_weight * nn.functional.binary_cross_entropy_with_logits(scores, labels)
    return loss


def config_dict(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "history"}
