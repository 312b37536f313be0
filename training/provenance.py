"""Which users' data a model version was trained on, kept without their ids: a Bloom filter of their
salted hashes in the model's metadata.

A Bloom filter answers "maybe" or "certainly not": about 1.2 bytes a user at a 1-in-1000 false
positive rate, so a million users fit in the metadata. ``persona status`` tests each tombstone
against each model version to list the versions trained on since-erased users.
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib

import numpy as np

FALSE_POSITIVE_RATE = 1e-3
METADATA_KEY = "trained_users"


def bloom(hashes: list[str], rate: float = FALSE_POSITIVE_RATE) -> dict:
    """A Bloom filter over the users' salted hashes, as JSON-safe metadata."""
    n = max(1, len(hashes))
    m = max(64, int(math.ceil(-n * math.log(rate) / math.log(2) ** 2)))
    k = max(1, round(m / n * math.log(2)))
    bits = np.zeros(m, dtype=bool)
    for h in hashes:
        bits[_positions(h, m, k)] = True
    packed = zlib.compress(np.packbits(bits).tobytes(), 9)
    return {"kind": "bloom", "hash": "sha256(salt, user_id)", "users": len(hashes), "bits": m, "k": k,
            "filter": base64.b64encode(packed).decode()}


def might_contain(meta: dict, id_hash: str) -> bool:
    m, k = int(meta["bits"]), int(meta["k"])
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(meta["filter"])), dtype=np.uint8))[:m]
    return bool(bits[_positions(id_hash, m, k)].all())


def _positions(id_hash: str, m: int, k: int) -> np.ndarray:
    """k bit positions by double hashing of the (already salted) hash."""
    digest = hashlib.sha256(id_hash.encode()).digest()
    a, b = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little") | 1
    return np.array([(a + i * b) % m for i in range(k)], dtype=np.int64)


def trained_on_erased(meta: dict, tombstones: set[str]) -> int:
    """How many erased users (tombstone hashes) the model was probably trained on."""
    record = meta.get(METADATA_KEY)
    if not record or record.get("kind") != "bloom":
        return 0
    return sum(might_contain(record, h) for h in tombstones)
