"""Per-device weight arena: one allocation made at start, each resident model in one
contiguous region of it, no device allocation on the request path.

Placement is first-fit over the free gaps. When no gap is large enough, the arena evicts a
*contiguous window*: among all runs of adjacent regions (and the free gaps between them)
that span the needed bytes and hold no model in use, it picks the one whose evicted models
cost least — the caller ranks models by eviction preference (LRU, or Torpor's policy that
keeps the only copy of a heavy model). That is how fragmentation is handled: a request never
fails while enough *contiguous* evictable room exists, and it never moves a resident model,
so a model's address stays fixed while it is resident (CUDA graphs and bound modules keep
working). A model has a *home* offset (the executor keeps it): taken when free, and winning
ties. Where CUDA graphs are bound to addresses (graphs.py), the home is *sticky*: when no
free gap fits and room must be made, the model goes back home whenever the models in that
window are idle and evictable, rather than to the window the eviction policy prices lowest,
since a graph replay costs a fraction of the eager run a new address needs (and of a
capture, ~0.1–1 s of the device). Models whose homes overlap then evict each other when the
arena is full. While free room exists, a model may go home, evicting the idle models there,
when its graphs are there and its cold graph (copies and kernels) beats its eager run
(``home_first``: the executor decides from the times measured at capture, and which models
may go): otherwise it would be a guest in a free gap away from its home, running eagerly
for as long as it stays resident. In the 1×H200 node run of 100 CNN functions a third of
the runs were such guests' eager runs, 2–5× slower than the graph runs (bench/README.md),
while a cold-graph swap-in of those models takes about its transfer time (1–4.4 ms). The
executor lets a home evict any idle model only while the arena is oversubscribed (it had to
evict or wait to find room lately, so free gaps are passing); with room to spare, only
guests (models away from their own homes) — two models with graphs at overlapping homes
would otherwise evict each other on every request in a nearly empty arena. Elsewhere (CPU
devices) addresses do not matter and the eviction policy alone picks the window.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

ALIGNMENT = 2 * 1024 * 1024  # bytes; regions start on 2 MiB boundaries (the copy group size)


class ArenaFull(Exception):
    """No window of the needed size can be freed now: every candidate holds a model in use,
    or the model is larger than the arena."""


@dataclass
class Region:
    """``size`` bytes at ``offset`` of the arena, holding model ``owner``."""

    offset: int
    size: int
    owner: str

    @property
    def end(self) -> int:
        return self.offset + self.size


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class Arena:
    """Book-keeping of one device's weight arena (the memory itself is owned by the caller).

    Args:
        capacity: arena size in bytes.
        alignment: region alignment in bytes.
    """

    def __init__(self, capacity: int, alignment: int = ALIGNMENT):
        self.capacity = capacity // alignment * alignment
        self.alignment = alignment
        self.regions: list[Region] = []  # sorted by offset

    @property
    def used(self) -> int:
        """Bytes held by regions."""
        return sum(r.size for r in self.regions)

    def region_of(self, owner: str) -> Region | None:
        return next((r for r in self.regions if r.owner == owner), None)

    def owners(self, offset: int, nbytes: int) -> list[str] | None:
        """Owners of the regions overlapping ``nbytes`` (rounded up to the alignment) at
        ``offset``, in address order; None when that is no window of this arena (not aligned,
        or past its end)."""
        end = offset + align_up(nbytes, self.alignment)
        if offset % self.alignment or end > self.capacity:
            return None
        return [r.owner for r in self.regions if r.offset < end and r.end > offset]

    def gaps(self) -> list[tuple[int, int]]:
        """Free ``(offset, size)`` ranges in address order."""
        out, cursor = [], 0
        for r in self.regions:
            if r.offset > cursor:
                out.append((cursor, r.offset - cursor))
            cursor = r.end
        if cursor < self.capacity:
            out.append((cursor, self.capacity - cursor))
        return out

    def plan(self, nbytes: int, evictable: Callable[[str], bool], cost: Callable[[list[str]], float],
             home: int | None = None, sticky_home: bool = False,
             home_first: Callable[[str], bool] | None = None) -> tuple[int, list[str]]:
        """Where ``nbytes`` would go and which owners must be evicted first.

        Args:
            nbytes: bytes needed (rounded up to the alignment).
            evictable: whether an owner may be evicted now (not in use).
            cost: price of evicting a window's owners together (lowest wins).
            home: the model's home offset, taken when free and on ties.
            sticky_home: when no free gap fits, take the home whenever its window holds no
                model in use and none whose eviction costs infinity (module docstring).
            home_first: take the home on those terms even while a free gap fits elsewhere,
                when every owner in its window passes this predicate (the executor's: a
                guest, away from its own home; or any, while the arena is oversubscribed).

        Returns:
            ``(offset, victims)``; victims is empty when a free gap fits.

        Raises:
            ArenaFull: no window can be freed.
        """
        size = align_up(nbytes, self.alignment)
        if size > self.capacity:
            raise ArenaFull(f"{nbytes} bytes exceed the arena's {self.capacity} bytes")
        covered = self.owners(home, size) if home is not None else None
        if covered == []:
            return home, []

        def home_free_to_take() -> bool:
            return all(evictable(o) for o in covered) and cost(covered) != float("inf")
        if covered is not None and home_first is not None and all(home_first(o) for o in covered) \
                and home_free_to_take():
            return home, covered
        fits = [off for off, gap in self.gaps() if gap >= size]
        if fits:
            return fits[0], []
        if sticky_home and covered is not None and home_free_to_take():
            return home, covered
        best: tuple[float, int, list[str]] | None = None
        # the home goes first so that it wins ties
        starts = ([home] if home is not None else []) + sorted(
            {0} | {r.end for r in self.regions} | {r.offset for r in self.regions})
        ends = [r.end for r in self.regions]  # sorted too: the regions never overlap
        for start in starts:
            if start % self.alignment or start + size > self.capacity:
                continue
            covered = []  # a window covers a run of adjacent regions: found by bisection, not a scan of all
            i = bisect.bisect_right(ends, start)
            while i < len(self.regions) and self.regions[i].offset < start + size:
                covered.append(self.regions[i].owner)
                i += 1
            if not all(evictable(o) for o in covered):
                continue
            price = cost(covered)
            if price == float("inf"):
                continue
            if best is None or price < best[0]:
                best = (price, start, covered)
        if best is None:
            raise ArenaFull(f"no contiguous {size} bytes can be freed: the models in the way are in use")
        return best[1], best[2]

    def _window_free(self, start: int, size: int) -> bool:
        return start % self.alignment == 0 and start + size <= self.capacity and not any(
            r.offset < start + size and r.end > start for r in self.regions)

    def place(self, owner: str, offset: int, nbytes: int) -> Region:
        """Records ``owner`` at ``offset``; the range must be free (evict first).

        Raises:
            ValueError: the range overlaps a region or leaves the arena, or is empty.
        """
        size = align_up(nbytes, self.alignment)
        if size <= 0:
            raise ValueError(f"a region needs bytes, not {nbytes}")  # plan bisects on non-empty regions
        if not self._window_free(offset, size):
            raise ValueError(f"[{offset}, {offset + size}) is not free")
        region = Region(offset, size, owner)
        bisect.insort(self.regions, region, key=lambda r: r.offset)
        return region

    def free(self, owner: str) -> Region:
        """Removes ``owner``'s region and returns it.

        Raises:
            KeyError: ``owner`` holds no region.
        """
        region = self.region_of(owner)
        if region is None:
            raise KeyError(owner)
        self.regions.remove(region)
        return region
