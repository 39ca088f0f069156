"""Metadata filters for Search: an inverted index from (key, value) to document labels.

A filter is a list of conditions ``(key, values)``; a document matches when, for every
condition, its metadata has ``key`` and its value is one of ``values`` (AND across conditions,
OR within one). The index answers a filter with the set of matching labels, which the first
stage then searches *within* (HNSW with a filter or an exact scan, BM25 with a weight mask)
instead of over-fetching and dropping: a selective filter still returns its k best documents.

Labels never change meaning (a re-upserted document gets a new label and its old one is
retired), so the index only ever adds a label's entries or removes them. It lives in memory
and is rebuilt from the document store on start.
"""

from __future__ import annotations

import threading
from typing import Iterable, Mapping, Sequence

Condition = tuple[str, Sequence[str]]


class MetadataIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._postings: dict[str, dict[str, set[int]]] = {}  # key -> value -> labels
        self._by_label: dict[int, Mapping[str, str]] = {}

    def add(self, labels: Iterable[int], metadatas: Iterable[Mapping[str, str]]) -> None:
        with self._lock:
            for lb, md in zip(labels, metadatas):
                lb = int(lb)
                if lb in self._by_label:
                    self._remove_locked(lb)
                if not md:
                    continue
                md = dict(md)
                self._by_label[lb] = md
                for k, v in md.items():
                    self._postings.setdefault(k, {}).setdefault(v, set()).add(lb)

    def remove(self, labels: Iterable[int]) -> None:
        with self._lock:
            for lb in labels:
                self._remove_locked(int(lb))

    def _remove_locked(self, lb: int) -> None:
        md = self._by_label.pop(lb, None)
        if not md:
            return
        for k, v in md.items():
            values = self._postings.get(k)
            if values is None:
                continue
            labels = values.get(v)
            if labels is not None:
                labels.discard(lb)
                if not labels:
                    del values[v]
            if not values:
                del self._postings[k]

    def matching(self, conditions: Sequence[Condition]) -> set[int]:
        """Labels whose metadata satisfies every condition (a new set the caller may keep)."""
        if not conditions:
            raise ValueError("matching() needs at least one condition (no filter = every document)")
        with self._lock:
            # Smallest condition first: the intersection never grows past it.
            sized = []
            for key, values in conditions:
                by_value = self._postings.get(key, {})
                sets = [by_value[v] for v in set(values) if v in by_value]
                sized.append((sum(len(s) for s in sets), sets))
            sized.sort(key=lambda x: x[0])
            out: set[int] | None = None
            for _, sets in sized:
                union = set().union(*sets) if sets else set()
                out = union if out is None else out & union
                if not out:
                    return set()
            return out if out is not None else set()

    def __len__(self) -> int:
        """Documents with any metadata."""
        return len(self._by_label)


def matches(metadata: Mapping[str, str], conditions: Sequence[Condition]) -> bool:
    """The same predicate for one document (the final check on fetched rows)."""
    return all(metadata.get(key) in set(values) for key, values in conditions)
