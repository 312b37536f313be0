"""BERT's output per distinct text, cached for the whole process.

BERT's lower layers are frozen, so each text goes through them once: the model variants, the refit
and serving all read the same cache. The cached texts may be a user's queries, so ``clear_all``
empties every cache (``/forget`` calls it).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextStates:
    """Cached token states of distinct texts (below BERT's trained top layers), and which text each row has.

    Rows index the table, so selecting rows never copies the states: a batch runs the top layers over
    the distinct texts it names.
    """

    states: torch.Tensor  # [D, T, H] padded token states
    mask: torch.Tensor  # [D, T] 1 for a real token
    rows: torch.Tensor  # [n] the text of each row

    def __getitem__(self, idx) -> TextStates:
        return TextStates(self.states, self.mask, self.rows[idx])

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> TextStates:
        return TextStates(self.states.to(device), self.mask.to(device), self.rows.to(device))


Text = torch.Tensor | TextStates  # mean-pooled vectors (frozen BERT), or states for the trained top layers


class TextCache:
    """Frozen BERT's mean-pooled vectors, one forward pass per distinct text, kept by text.

    Safe to share between threads (serving encodes from several at once): the dict is only touched
    under ``lock``, and the fast tokenizer, which raises "Already borrowed" when two threads use it at
    once, only under ``tokenizer_lock``. BERT's forward pass runs outside both.
    """

    def __init__(self, bert: nn.Module, tokenizer, max_size: int | None = None):
        self.bert, self.tokenizer, self.max_size = bert, tokenizer, max_size
        self.vectors: dict[tuple[str, int], torch.Tensor] = {}
        self.lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()

    def __getstate__(self) -> dict:
        """A copy for another process (a model broadcast to Spark's tasks): the encoder, no locks, and
        none of the cached texts (they may be a user's)."""
        return {"bert": self.bert, "tokenizer": self.tokenizer, "max_size": self.max_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bert"], state["tokenizer"], state["max_size"])

    def encode(self, texts: list[str], max_len: int) -> torch.Tensor:
        found = self._lookup(texts, max_len)
        return torch.stack([found[t] for t in texts]) if texts else torch.zeros(0, self.bert.config.hidden_size)

    def clear(self) -> None:
        """Forget every cached text (they may be a user's)."""
        with self.lock:
            self.vectors.clear()

    def _lookup(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        """Each distinct text's cached value, computing the missing ones in length-sorted chunks."""
        distinct = list(dict.fromkeys(texts))
        with self.lock:  # what is cached now: later evictions (by this call or another) cannot lose it
            found = {t: v for t in distinct if (v := self.vectors.get((t, max_len))) is not None}
        missing = sorted((t for t in distinct if t not in found), key=len)  # similar lengths: little padding
        fresh = {}
        for s in range(0, len(missing), 64):
            chunk = missing[s:s + 64]
            fresh.update(zip(chunk, self._forward(chunk, max_len), strict=True))
        with self.lock:
            self.vectors.update({(t, max_len): v for t, v in fresh.items()})
            overflow = len(self.vectors) - (self.max_size or len(self.vectors))
            for key in list(itertools.islice(self.vectors, max(0, overflow))):
                del self.vectors[key]  # oldest first
        found.update(fresh)
        return found

    def token_ids(self, texts: list[str], max_len: int) -> list[list[int]]:
        """Each text's token ids, without the special tokens. Every use of the shared tokenizer goes
        through ``tokenizer_lock``: a call outside it, beside an encode, fails with "Already borrowed"."""
        with self.tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]

    def _tokens(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        device = next(self.bert.parameters()).device
        with self.tokenizer_lock:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    @torch.no_grad()
    def _forward(self, texts: list[str], max_len: int) -> list[torch.Tensor]:
        enc = self._tokens(texts, max_len)
        hidden = self.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return list(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float().cpu())


class TokenStateCache(TextCache):
    """The token states that enter BERT's top ``top`` layers, one forward pass per distinct text.

    The layers below stay frozen, so these states never change while the top layers train; they stay
    on BERT's device (bfloat16 on CUDA: half the memory).
    """

    def __init__(self, bert: nn.Module, tokenizer, top: int):
        super().__init__(bert, tokenizer)
        self.top = top

    def encode(self, texts: list[str], max_len: int) -> TextStates:
        found = self._lookup(texts, max_len)
        where = {t: k for k, t in enumerate(dict.fromkeys(texts))}
        if not where:
            empty = torch.zeros(0, 1, self.bert.config.hidden_size)
            return TextStates(empty, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        states = nn.utils.rnn.pad_sequence([found[t] for t in where], batch_first=True)
        lengths = torch.tensor([len(found[t]) for t in where], device=states.device)
        mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).long()
        return TextStates(states, mask, torch.tensor([where[t] for t in texts], device=states.device))

    @torch.no_grad()
    def _forward(self, texts: list[str], max_len: int) -> list[torch.Tensor]:
        enc = self._tokens(texts, max_len)
        was_training = self.bert.training
        self.bert.eval()  # no dropout in what is cached
        try:
            states = self.bert(**enc, output_hidden_states=True).hidden_states[-1 - self.top]
        finally:
            self.bert.train(was_training)
        dtype = torch.bfloat16 if states.device.type == "cuda" else torch.float32
        lengths = enc["attention_mask"].sum(1).tolist()
        return [states[k, :n].to(dtype) for k, n in enumerate(lengths)]


_TEXT_CACHES: dict[tuple[str, int], TextCache] = {}  # (BERT path, trained top layers) -> its cache
_TEXT_CACHES_LOCK = threading.Lock()


def shared_text_cache(bert_path: str, bert: nn.Module, tokenizer, top: int = 0) -> TextCache:
    """One cache per BERT (and number of trained top layers) in a process: the model variants and the
    refit reuse each other's vectors or states. The layers a cache runs are frozen in every model that
    shares it, so whose BERT computes them does not matter."""
    with _TEXT_CACHES_LOCK:
        if (bert_path, top) not in _TEXT_CACHES:
            _TEXT_CACHES[bert_path, top] = TokenStateCache(bert, tokenizer, top) if top else TextCache(bert, tokenizer)
        return _TEXT_CACHES[bert_path, top]


def clear_all() -> None:
    """Empty every text cache in this process (every BERT's, the ranker's included): ``/forget``."""
    with _TEXT_CACHES_LOCK:
        caches = list(_TEXT_CACHES.values())
    for cache in caches:
        cache.clear()
