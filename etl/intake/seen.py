"""The client_order_ids seen so far in one file, in 12 bytes each, exact.

Why not a set of strings: a dict of every id string costs ~120 bytes an id (121 MiB for a
million rows), so validation memory would grow with the file. Here each id seen is a 64-bit hash
(pandas' vectorised SipHash) and the line it first appeared on, kept in sorted NumPy runs (merged
like a binary counter, so adding a chunk stays cheap). A hash that matches is checked against
the real id, read again from the file (`id_at(line)`), so two different ids that happen to share
a hash never reject a row; such colliding ids (astronomically rare) are tracked exactly in a
small dict.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd


def hash64(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of an object array of strings (pandas' SipHash, vectorised)."""
    return pd.util.hash_array(ids, categorize=False)


class SeenIds:
    def __init__(self, id_at: Callable[[int], str | None], *,
                 hash_fn: Callable[[np.ndarray], np.ndarray] = hash64) -> None:
        self._id_at = id_at  # the id on a line already checked, read again from the file
        self._hash = hash_fn
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted uint64 hashes, int32 first lines)
        self._collided: dict[str, int] = {}  # id -> first line, for ids whose hash another id had first

    @property
    def count(self) -> int:
        return sum(len(h) for h, _ in self._runs) + len(self._collided)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes + ln.nbytes for h, ln in self._runs)

    def check(self, lines: np.ndarray, ids: np.ndarray) -> list[tuple[int, str, int]]:
        """Register one chunk's ids (object array, NaN/None where missing; `lines` ascending)
        and return (line, id, first line) for every id that appeared on an earlier line."""
        present = pd.notna(ids)
        if not present.any():
            return []
        ids = ids[present]
        lines = np.asarray(lines)[present]
        hashes = np.asarray(self._hash(ids), dtype=np.uint64)
        uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        before = self._lookup(uniq)
        hits = np.flatnonzero((before[inverse] >= 0) | (np.arange(len(hashes)) != first[inverse]))
        repeats: list[tuple[int, str, int]] = []
        reread: dict[int, str | None] = {}
        for r in hits.tolist():
            cid, line, u = ids[r], int(lines[r]), inverse[r]
            if before[u] >= 0:
                candidate = int(before[u])
                if candidate not in reread:
                    reread[candidate] = self._id_at(candidate)
                same = reread[candidate] == cid
            else:
                candidate = int(lines[first[u]])
                same = ids[first[u]] == cid
            if not same:  # a different id with the same hash: track this id exactly
                candidate = self._collided.setdefault(cid, line)
            if candidate != line:
                repeats.append((line, cid, candidate))
        new = before < 0
        if new.any():
            self._add(uniq[new], lines[first[new]].astype(np.int32))
        return repeats

    def _lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The first line of each (sorted, unique) hash seen before, or -1."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        for run_h, run_l in self._runs:
            pos = np.searchsorted(run_h, hashes)
            ok = pos < len(run_h)
            ok[ok] = run_h[pos[ok]] == hashes[ok]
            found[ok] = run_l[pos[ok]]
        return found

    def _add(self, hashes: np.ndarray, lines: np.ndarray) -> None:
        self._runs.append((hashes, lines))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (h1, l1), (h2, l2) = self._runs[-2], self._runs.pop()
            self._runs[-1] = _merged(h1, l1, h2, l2)


def _merged(h1: np.ndarray, l1: np.ndarray, h2: np.ndarray, l2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, the first's entries before the second's equal ones; written
    straight into the result (no argsort of the whole: the largest merge of a million ids
    needed ~32 bytes an id on top of the runs, this ~17)."""
    n = len(h1) + len(h2)
    at = np.searchsorted(h1, h2, side="right") + np.arange(len(h2))  # where h2's entries land
    hashes, lines = np.empty(n, dtype=h1.dtype), np.empty(n, dtype=l1.dtype)
    rest = np.ones(n, dtype=bool)
    rest[at] = False
    hashes[at], lines[at] = h2, l2
    hashes[rest], lines[rest] = h1, l1
    return hashes, lines
