"""Tables as columns: NumPy arrays, and variable-length byte strings packed into one buffer.

A million file names or captions as Python objects take over 60 bytes each and are traversed by the
garbage collector; packed, they are their bytes plus 8, and a whole column compares, saves and loads at
memory speed. A table is a dict of equally long columns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np

# Rows per slice where whole-column work would otherwise make temporaries the size of the column.
_SLICE = 1 << 18


@dataclass(frozen=True, eq=False)
class Packed:
    blob: bytes
    offsets: np.ndarray  # int64, one more than the strings: string i is blob[offsets[i]:offsets[i + 1]]

    @classmethod
    def from_bytes(cls, items: Sequence[bytes]) -> "Packed":
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        return cls(b"".join(items), _offsets(lengths))

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "Packed":
        """File names in the file system's encoding. Joined around NUL, which no file name contains, the
        whole column is encoded in one call instead of one per name."""
        if not names:
            return cls.empty()
        joined = os.fsencode("\0".join(names))
        ends = np.flatnonzero(np.frombuffer(joined, dtype=np.uint8) == 0)
        offsets = np.empty(len(names) + 1, dtype=np.int64)
        offsets[0], offsets[-1] = 0, len(joined) - len(ends)
        offsets[1:-1] = ends - np.arange(len(ends))  # less the separators before each name
        return cls(joined.replace(b"\0", b""), offsets)

    @classmethod
    def empty(cls) -> "Packed":
        return cls(b"", np.zeros(1, dtype=np.int64))

    @classmethod
    def join(cls, parts: Sequence["Packed"]) -> "Packed":
        if not parts:
            return cls.empty()
        lengths = np.concatenate([part.lengths() for part in parts])
        return cls(b"".join(part.blob for part in parts), _offsets(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        return self.blob[self.offsets[index]:self.offsets[index + 1]]

    def __iter__(self) -> Iterator[bytes]:
        blob, offsets = self.blob, self.offsets.tolist()
        return (blob[begin:end] for begin, end in zip(offsets, offsets[1:]))

    def name(self, index: int) -> str:
        return os.fsdecode(self[index])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def equals(self, other: "Packed") -> bool:
        return self.blob == other.blob and np.array_equal(self.offsets, other.offsets)

    def take(self, rows: np.ndarray) -> "Packed":
        """The strings of `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return Packed.empty()
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self  # all of them in order: the column is immutable, so no copy is needed
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        # Rows that follow each other in the buffer (an unchanged stretch of a refreshed index) are
        # copied as one slice, so the cost is per stretch, not per string.
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        run_starts = starts[np.concatenate(([0], breaks))].tolist()
        run_ends = ends[np.concatenate((breaks - 1, [len(rows) - 1]))].tolist()
        blob = b"".join(self.blob[begin:end] for begin, end in zip(run_starts, run_ends))
        return Packed(blob, _offsets(ends - starts))

    def sorted_rows(self) -> np.ndarray:
        """The rows in the order of their bytes (for UTF-8 names, the order of their characters), equal
        strings in row order. A least-significant-digit radix sort over 8-byte digits: a few whole-column
        passes for file names, and no Python object per string."""
        rows = np.arange(len(self), dtype=np.int64)
        if len(rows):
            digits = _Digits(self)
            for digit in range((int(digits.lengths.max()) - 1) // 8 * 8, -1, -8):
                rows = rows[np.argsort(digits(rows, digit), kind="stable")]
        return rows

    def find(self, queries: "Packed") -> np.ndarray:
        """For each string of `queries`, the row of the equal string here (the last of several), or -1.

        The strings are matched by 64-bit hashes, each column's sorted (a sort of integers, far cheaper
        than one of strings), and each match is confirmed byte for byte. Where two strings here share a
        hash (equal strings, or a collision), the strings themselves are sorted instead."""
        mine, theirs = _Digits(self), _Digits(queries)
        hashes = _hashes(mine)
        by_hash = np.argsort(hashes)
        hashes = hashes[by_hash]
        if np.any(hashes[1:] == hashes[:-1]):
            return self._find_by_sorting(queries)
        rows = np.full(len(queries), -1, dtype=np.int64)
        if not len(self):
            return rows
        wanted = _hashes(theirs)
        query_order = np.argsort(wanted)
        wanted = wanted[query_order]
        # Sorted queries make the binary searches one sweep through memory.
        at = np.minimum(np.searchsorted(hashes, wanted), len(self) - 1)
        hit = np.flatnonzero(hashes[at] == wanted)
        rows[query_order[hit]] = by_hash[at[hit]]
        # Confirmed in query order: a listing in nearly the stored order then reads both columns in turn.
        candidates = np.flatnonzero(rows >= 0)
        rows[candidates[~_equal(mine, rows[candidates], theirs, candidates)]] = -1
        return rows

    def _find_by_sorting(self, queries: "Packed") -> np.ndarray:
        order, new_run = Packed.join([self, queries])._sorted_runs()
        rows = np.full(len(queries), -1, dtype=np.int64)
        if not len(order):
            return rows
        # Equal strings are neighbours in sorted order, this column's first (the sort is stable): each
        # query takes the last string of this column in its run of equal strings, if there is one.
        positions = np.arange(len(order))
        run_start = np.maximum.accumulate(np.where(new_run, positions, 0))
        mine = order < len(self)
        last_mine = np.maximum.accumulate(np.where(mine, positions, -1))
        found = ~mine & (last_mine >= run_start)
        rows[order[found] - len(self)] = order[last_mine[found]]
        return rows

    def _sorted_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(the sorted rows, whether each starts a run of equal strings in that order)."""
        order = self.sorted_rows()
        new_run = np.ones(len(order), dtype=bool)
        digits = _Digits(self)
        new_run[1:] = ~_equal(digits, order[:-1], digits, order[1:])
        return order, new_run

    def searchsorted(self, order: np.ndarray, queries: "Packed") -> np.ndarray:
        """For each string of `queries`, how many of the strings of rows `order` (in sorted order, see
        sorted_rows) sort before it: where it goes among them. A binary search of all queries at once,
        each halving one pass over the queries still searching."""
        low = np.zeros(len(queries), dtype=np.int64)
        high = np.full(len(queries), len(order), dtype=np.int64)
        mine, theirs = _Digits(self), _Digits(queries)
        active = np.flatnonzero(low < high)
        while len(active):
            middle = (low[active] + high[active]) // 2
            before = _less(mine, order[middle], theirs, active)
            low[active[before]] = middle[before] + 1
            high[active[~before]] = middle[~before]
            active = active[low[active] < high[active]]
        return low

    def stems(self) -> "Packed":
        """Each string up to its last dot (the file name without its extension); one without a dot whole."""
        blob = np.frombuffer(self.blob, dtype=np.uint8)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        dots = np.concatenate(([-1], np.flatnonzero(blob == ord("."))))
        last_dot = dots[np.searchsorted(dots, ends, side="left") - 1]
        cut = np.where(last_dot >= starts, last_dot, ends)
        # Keep the bytes from each start to its cut: +1 at the start, -1 at the cut, summed along.
        edges = np.zeros(len(blob) + 1, dtype=np.int8)
        np.add.at(edges, starts, 1)
        np.add.at(edges, cut, -1)
        keep = np.cumsum(edges[:-1], dtype=np.int8) > 0
        return Packed(blob[keep].tobytes(), _offsets(cut - starts))


# An odd constant with well-spread bits (2^64 over the golden ratio): multiplying by it mixes each digit
# into all the higher bits of the hash.
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


class _Digits:
    """digits(rows, digit): bytes digit to digit + 7 of each row's string as one big-endian number,
    zeros past its end, so that numbers compare as the bytes do. Computed a slice of rows at a time
    to keep the temporary arrays small."""

    def __init__(self, column: Packed):
        # The 8 bytes from each place of the buffer as one number: overlapping items one byte apart, read
        # in place (only a buffer shorter than one number is copied, padded).
        blob = column.blob if len(column.blob) >= 8 else column.blob + bytes(8 - len(column.blob))
        self._last = len(blob) - 8
        self._numbers = np.ndarray(shape=(self._last + 1,), dtype=">u8", buffer=blob, strides=(1,))
        self._starts, self.lengths = column.offsets[:-1], column.lengths()

    def __call__(self, rows: np.ndarray, digit: int) -> np.ndarray:
        found = np.empty(len(rows), dtype=np.uint64)
        for begin in range(0, len(rows), _SLICE):
            part = rows[begin:begin + _SLICE]
            places = self._starts[part] + digit
            read = np.minimum(places, self._last)
            # A shift by 64 is undefined, hence each shift done in two halves. Within 8 bytes of the end,
            # the number was read from earlier: shift the wanted bytes up to the top.
            early = (np.uint64(4) * np.minimum(places - read, 8)).astype(np.uint64)
            values = self._numbers[read].astype(np.uint64) << early << early
            # Clear the bytes past the end.
            half = (np.uint64(4) * (8 - np.clip(self.lengths[part] - digit, 0, 8))).astype(np.uint64)
            found[begin:begin + len(part)] = values >> half >> half << half << half
        return found


def _hashes(digits: _Digits) -> np.ndarray:
    """A 64-bit hash of each string: its length, then its 8-byte digits multiplied in, each digit over
    the strings that reach it."""
    hashes = digits.lengths.astype(np.uint64) * _HASH_MULTIPLIER
    for digit in range(0, int(digits.lengths.max()) if len(digits.lengths) else 0, 8):
        rows = np.flatnonzero(digits.lengths > digit)
        # uint64 products wrap around, as a hash wants.
        hashes[rows] = (hashes[rows] ^ digits(rows, digit)) * _HASH_MULTIPLIER
    return hashes


def _equal(first: _Digits, first_rows: np.ndarray, second: _Digits, second_rows: np.ndarray) -> np.ndarray:
    """Whether the string of row first_rows[i] of one column equals that of row second_rows[i] of
    another (or the same); each digit is compared only where both strings reach it."""
    lengths = first.lengths[first_rows]
    equal = lengths == second.lengths[second_rows]
    for digit in range(0, int(lengths.max()) if len(lengths) else 0, 8):
        candidates = np.flatnonzero(equal & (lengths > digit))
        for begin in range(0, len(candidates), _SLICE):
            pairs = candidates[begin:begin + _SLICE]
            equal[pairs] = first(first_rows[pairs], digit) == second(second_rows[pairs], digit)
    return equal


def _less(first: _Digits, first_rows: np.ndarray, second: _Digits, second_rows: np.ndarray) -> np.ndarray:
    """Whether the string of row first_rows[i] of one column sorts before that of row second_rows[i] of
    another: decided by the first digit where they differ, looked at only for the pairs still tied."""
    less = np.zeros(len(first_rows), dtype=bool)
    tied = np.arange(len(first_rows))
    reach = np.maximum(first.lengths[first_rows], second.lengths[second_rows])
    digit = 0
    while len(tied):
        mine, theirs = first(first_rows[tied], digit), second(second_rows[tied], digit)
        less[tied] = mine < theirs
        digit += 8
        tied = tied[(mine == theirs) & (reach[tied] > digit)]
    return less


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


Column = Union[np.ndarray, Packed]


def take(table: dict[str, Column], rows: np.ndarray) -> dict[str, Column]:
    return {name: column.take(rows) if isinstance(column, Packed) else column[rows]
            for name, column in table.items()}


def concat(tables: Sequence[dict[str, Column]]) -> dict[str, Column]:
    """The tables' rows one after another; they have the same columns."""
    return {name: Packed.join([t[name] for t in tables]) if isinstance(column, Packed)
            else np.concatenate([t[name] for t in tables]) for name, column in tables[0].items()}
