"""The process-wide text cache and tokenizer under side-by-side requests (serving runs threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from transformers import AutoModel, AutoTokenizer

from bentos.ranking import unknown_share
from training.text_cache import TextCache


def test_unknown_share_beside_encodes_never_collides(tiny_bert):
    """A query's unknown-token share (words-first) and an in-process encode share one fast tokenizer,
    which raises "Already borrowed" when two threads use it at once: every use goes through its lock.
    Known answers too: 𓀀 is one unknown token of two."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = TextCache(AutoModel.from_pretrained(tiny_bert).eval(), tokenizer, max_size=4)
    model = SimpleNamespace(texts=cache, tokenizer=tokenizer)  # what a ProfileModel carries

    def work(n: int) -> float:
        if n % 2:
            return float(cache.encode([f"espresso kettle {n} {k} " * 40 for k in range(8)], 128).shape[0])
        return unknown_share(model, ["𓀀 trail " * (n % 5 + 1)])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(work, range(2000)))
    assert {answers[n] for n in range(1, 2000, 2)} == {8.0}
    assert {answers[n] for n in range(0, 2000, 2)} == {0.5}  # 𓀀 trail: one token of two unknown


def test_unknown_share_known_answers(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = TextCache(AutoModel.from_pretrained(tiny_bert).eval(), tokenizer)
    model = SimpleNamespace(texts=cache, tokenizer=tokenizer)
    assert unknown_share(model, ["hello world"]) == 0.0
    assert unknown_share(model, ["𓀀 hello", None, ""]) == 0.5
    assert unknown_share(model, []) == 0.0
    assert unknown_share(SimpleNamespace(texts=None, tokenizer=tokenizer), ["hello"]) == 1.0  # no text branch
