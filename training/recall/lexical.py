"""Candidate source: items whose text matches the query (BM25, with ``bm25s``).

Tokens are lower-cased words and numbers (model numbers and brand names match as written) and, for
scripts written without spaces (Chinese, Japanese), overlapping character pairs: no dictionary, so
it works for any language.
"""

from __future__ import annotations

import re

import bm25s
import numpy as np
import pandas as pd

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


def item_texts(items: pd.DataFrame) -> list[str]:
    """Each item's title, brand and category: what a query is matched against."""
    cols = [items[c].astype(object).where(items[c].notna(), "").astype(str).tolist() if c in items
            else [""] * len(items) for c in ("title", "brand", "category")]
    return [" ".join(parts) for parts in zip(*cols, strict=True)]


def matched_terms(query: str, text: str, limit: int = 3) -> list[str]:
    """The query's words found in ``text``, longest first: whole words, and for a run of CJK characters
    its longest pieces (two characters or more) that the text contains."""
    haystack = text.lower()
    words = set(tokens(haystack))
    found: list[str] = []
    for word in _WORD.findall(query.lower()):
        for part in [w for w in _UNSPACED.split(word) if w]:
            if part in words:
                found.append(part)
        for run in _UNSPACED.findall(word):
            found += _pieces_in(run, haystack)
    return sorted(dict.fromkeys(found), key=len, reverse=True)[:limit]


def _pieces_in(run: str, text: str) -> list[str]:
    """Greedy, left to right: the longest substring of ``run`` starting here that ``text`` holds."""
    out, start = [], 0
    while start < len(run) - 1:
        end = len(run)
        while end - start >= 2 and run[start:end] not in text:
            end -= 1
        if end - start >= 2:
            out.append(run[start:end])
            start = end
        else:
            start += 1
    return out
