"""Splits by position with gaps: neighbouring slices or tiles look alike, so they share a split.

Positions along one axis (a slice index, millimetres from the midline, a tile's rows) are cut into
bands, each band belonging to one split. An item spanning [start, stop) is kept only when it and
`margin` positions either side lie in bands of a single split, so items of different splits are at
least 2 * margin apart: no test slice has a training neighbour.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from medplib.core.errors import InvalidInputError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PositionSplit:
    bands: tuple[tuple[int, int, str], ...]  # (start, stop, split), [start, stop) half-open
    margin: int

    def __post_init__(self) -> None:
        for (_, stop, _), (start, _, _) in itertools.pairwise(self.bands):
            if stop != start:
                raise InvalidInputError(f"bands must be sorted and contiguous; {stop} is followed by {start}")
        for start, stop, split in self.bands:
            if start >= stop or split not in SPLITS:
                raise InvalidInputError(f"bad band ({start}, {stop}, {split!r}); splits are {SPLITS}")

    @classmethod
    def repeating(cls, length: int, block: int, pattern: tuple[str, ...], margin: int) -> PositionSplit:
        """Blocks of `block` positions over [0, length), assigned to `pattern`'s splits in turn."""
        starts = range(0, length, block)
        bands = tuple((s, min(s + block, length), pattern[i % len(pattern)]) for i, s in enumerate(starts))
        return cls(bands, margin)

    def split_of(self, start: int, stop: int | None = None) -> str | None:
        """The split of the item spanning [start, stop) (one position if `stop` is None), or None when
        it lies within `margin` of another split's band (it falls in a gap) or outside the bands."""
        stop = start + 1 if stop is None else stop
        if not self.bands or start < self.bands[0][0] or stop > self.bands[-1][1]:
            return None
        low, high = start - self.margin, stop + self.margin
        touched = {split for s, e, split in self.bands if s < high and low < e}
        return touched.pop() if len(touched) == 1 else None
