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
        # Bumped by every add/remove that changes a posting (not by writes of documents without
        # metadata): a FilterView re-reads only after a change that can alter its answer.
        self.version = 0

    def add(self, labels: Iterable[int], metadatas: Iterable[Mapping[str, str]]) -> None:
        with self._lock:
            if self._add_locked(labels, metadatas):
                self.version += 1

    def _add_locked(self, labels: Iterable[int], metadatas: Iterable[Mapping[str, str]]) -> bool:
        changed = False
        for lb, md in zip(labels, metadatas):
            lb = int(lb)
            changed |= self._remove_locked(lb)
            if not md:
                continue
            md = dict(md)
            self._by_label[lb] = md
            for k, v in md.items():
                self._postings.setdefault(k, {}).setdefault(v, set()).add(lb)
            changed = True
        return changed

    def reset(self, labels: Iterable[int], metadatas: Iterable[Mapping[str, str]]) -> None:
        """Replace the whole contents (a rebuild from the store) in one step: the new contents
        are built aside, then swapped in under the lock, so a search reads the old contents or
        the new, never the empty index between, and is not held up while they are built; views
        held by searches see the version change and re-read."""
        fresh = MetadataIndex()
        fresh._add_locked(labels, metadatas)
        with self._lock:
            self._postings, self._by_label = fresh._postings, fresh._by_label
            self.version += 1

    def remove(self, labels: Iterable[int]) -> None:
        with self._lock:
            changed = False
            for lb in labels:
                changed |= self._remove_locked(int(lb))
            if changed:
                self.version += 1

    def _remove_locked(self, lb: int) -> bool:
        """Drop a label's entries; True if it had any."""
        md = self._by_label.pop(lb, None)
        if not md:
            return False
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
        return True

    def matching(self, conditions: Sequence[Condition]) -> set[int]:
        """Labels whose metadata satisfies every condition (a new set the caller may keep)."""
        return self.matching_at(conditions)[1]

    def matching_at(self, conditions: Sequence[Condition]) -> tuple[int, set[int]]:
        """``(version, labels)``: the matching labels and the index version they were read at."""
        if not conditions:
            raise ValueError("matching() needs at least one condition (no filter = every document)")
        with self._lock:
            # Smallest condition first: the result never grows past it, and every later
            # condition only tests those few labels (no union of a broad condition is built).
            sized = []
            for key, values in conditions:
                by_value = self._postings.get(key, {})
                sets = [by_value[v] for v in set(values) if v in by_value]
                sized.append((sum(len(s) for s in sets), sets))
            sized.sort(key=lambda x: x[0])
            out: set[int] = set().union(*sized[0][1])
            for _, sets in sized[1:]:
                if not out:
                    break
                out = {lb for lb in out if any(lb in s for s in sets)}
            return self.version, out

    def __len__(self) -> int:
        """Documents with any metadata."""
        return len(self._by_label)


def matches(metadata: Mapping[str, str], conditions: Sequence[tuple[str, frozenset[str]]]) -> bool:
    """The same predicate for one document (the final check on fetched rows)."""
    return all(metadata.get(key) in values for key, values in conditions)


class FilterView:
    """The labels matching one Search's filter, as of the moment it is called: read once, and
    again only when the index changed since (a write between the two first-stage legs, or
    between the filter's first read and a leg's index read)."""

    def __init__(self, index: MetadataIndex, conditions: Sequence[Condition]) -> None:
        self._index = index
        self._conditions = conditions
        self._state = index.matching_at(conditions)  # (version, labels): one attribute, swapped whole
        self.empty_at_start = not self._state[1]

    def __call__(self) -> set[int]:
        version, labels = self._state  # the two legs may call this from two threads at once
        if self._index.version != version:
            version, labels = self._state = self._index.matching_at(self._conditions)
        return labels
