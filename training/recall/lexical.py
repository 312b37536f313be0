"""Candidate source: items whose text matches the query (BM25, with ``bm25s``).

Tokens are lower-cased words and numbers (model numbers and brand names match as written) and, for
scripts written without spaces (Chinese, Japanese), overlapping character pairs: no dictionary, so
it works for any language.
"""

from __future__ import annotations

import re

import bm25s
import numpy as np

from training.recall.history import Recent

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def tokens(text: str) -> list[str]:
    """Words and numbers; a run of CJK characters as its characters and character pairs."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        runs = _UNSPACED.findall(word)
        if not runs:
            out.append(word)
            continue
        out += [w for w in _UNSPACED.split(word) if w]
        for run in runs:
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
    return out


class LexicalSource:
    name = "matches your search"

    def __init__(self, texts: list[str]):
        self.n_items = len(texts)
        self.index = bm25s.BM25()
        corpus = [tokens(t) or ["\u0000"] for t in texts]  # bm25s needs a token per document
        self.index.index(corpus, show_progress=False)

    def scores(self, recent: Recent, now: float, query: str | None) -> np.ndarray | None:
        """BM25 of each item's text for the query; None without a query (no opinion)."""
        words = tokens(query) if query else []
        if not words:
            return None
        return np.asarray(self.index.get_scores(words), dtype=np.float32)
