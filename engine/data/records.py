"""The images a scan found usable, as a sequence of ImageRecord built one at a time from the index's columns.

A folder of a million images would otherwise be a million records, paths and captions held as Python
objects (several hundred MB) by every caller that only counts them, buckets them or looks at a few.
The records of several scans (a run's concepts) chain into one such sequence.
"""
from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Iterable, Optional

import numpy as np

from .columns import Packed

TXT_PROMPT = "{TXT_PROMPT}"
_BLOCK = 4096


@dataclass(slots=True)
class ImageRecord:
    path: str
    width: int
    height: int
    caption: str = ""  # the resolved prompt for this image


class LazyRecords(Sequence):
    """A sequence of ImageRecord that builds each record when asked, and gives a selection of itself
    (take) and its sides (widths, heights) as whole columns."""

    @abstractmethod
    def take(self, indices) -> "LazyRecords":
        """The records at these positions of this sequence, as another lazy sequence."""

    @property
    @abstractmethod
    def widths(self) -> np.ndarray:
        """Each record's width, as a column."""

    @property
    @abstractmethod
    def heights(self) -> np.ndarray:
        """Each record's height, as a column."""

    def __eq__(self, other) -> bool:
        # Compares like the list of records it stands for.
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"<{len(self)} image records>"


class ImageRecords(LazyRecords):
    """Rows `rows` of a folder's image columns, in that order.

    names: the file names; texts and caption_rows, when the prompt template has {TXT_PROMPT}: the
    caption texts and, per image row, the row of its caption (-1 for none).
    """

    def __init__(self, prefix: str, names: Packed, widths: np.ndarray, heights: np.ndarray, rows: np.ndarray,
                 template: str, texts: Optional[Packed] = None, caption_rows: Optional[np.ndarray] = None):
        self._prefix, self._names, self._template = prefix, names, template
        self._all_widths, self._all_heights = widths, heights
        self._rows = np.asarray(rows, dtype=np.int64)
        self._texts, self._caption_rows = texts, caption_rows

    def _record(self, row: int) -> ImageRecord:
        (prompt,) = self._prompts(np.array([row]))
        return ImageRecord(self._prefix + self._names.name(row), int(self._all_widths[row]),
                           int(self._all_heights[row]), prompt)

    def take(self, indices) -> "ImageRecords":
        return ImageRecords(self._prefix, self._names, self._all_widths, self._all_heights,
                            self._rows[np.asarray(indices, dtype=np.int64)], self._template, self._texts,
                            self._caption_rows)

    @property
    def widths(self) -> np.ndarray:
        return self._all_widths[self._rows]

    @property
    def heights(self) -> np.ndarray:
        return self._all_heights[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self._rows))[index])
        return self._record(int(self._rows[index]))

    def __iter__(self):
        # A block of rows at a time: whole columns to Python values, then one record per row.
        blob, offsets, prefix = self._names.blob, self._names.offsets, self._prefix
        for begin in range(0, len(self._rows), _BLOCK):
            rows = self._rows[begin:begin + _BLOCK]
            for start, end, width, height, prompt in zip(offsets[rows].tolist(), offsets[rows + 1].tolist(),
                                                         self._all_widths[rows].tolist(),
                                                         self._all_heights[rows].tolist(), self._prompts(rows)):
                yield ImageRecord(prefix + os.fsdecode(blob[start:end]), width, height, prompt)

    def _prompts(self, rows: np.ndarray) -> Iterable[str]:
        if self._texts is None:
            return repeat(self._template, len(rows))
        texts, template = self._texts, self._template
        return [template.replace(TXT_PROMPT, texts[caption].decode("utf-8") if caption >= 0 else "").strip(" ,")
                for caption in self._caption_rows[rows].tolist()]

    def __repr__(self) -> str:
        return f"<{len(self)} image records in {self._prefix}>"


class RecordChain(LazyRecords):
    """Lazy record sequences one after another (the records of a run's concepts), or a selection of
    them: `positions` are places in the parts taken one after another, all of them in order by default."""

    def __init__(self, parts: Sequence[LazyRecords], positions: Optional[np.ndarray] = None):
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [len(part) for part in self._parts], dtype=np.int64)
        self._positions = (np.arange(self._starts[-1], dtype=np.int64) if positions is None
                           else np.asarray(positions, dtype=np.int64))

    def _located(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the part, the index in it) of each position."""
        parts = np.searchsorted(self._starts, positions, side="right") - 1
        return parts, positions - self._starts[parts]

    def take(self, indices) -> "RecordChain":
        return RecordChain(self._parts, self._positions[np.asarray(indices, dtype=np.int64)])

    def _column(self, name: str) -> np.ndarray:
        if not self._parts:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([getattr(part, name) for part in self._parts])[self._positions]

    @property
    def widths(self) -> np.ndarray:
        return self._column("widths")

    @property
    def heights(self) -> np.ndarray:
        return self._column("heights")

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self._positions))[index])
        part, within = self._located(self._positions[index])
        return self._parts[int(part)][int(within)]

    def __iter__(self):
        # A block of positions at a time, each stretch of one part built by that part's own iteration.
        for begin in range(0, len(self._positions), _BLOCK):
            parts, indices = self._located(self._positions[begin:begin + _BLOCK])
            breaks = np.flatnonzero(parts[1:] != parts[:-1]) + 1
            for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(parts)]):
                yield from self._parts[int(parts[start])].take(indices[start:end])
