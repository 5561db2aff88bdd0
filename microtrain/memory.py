"""Explicit memory planning: buffers as lifetime intervals placed first-fit in ONE arena.

A training step is a sequence of numbered steps (forward nodes, then backward nodes in reverse,
then the optimizer). Every buffer the step uses is an interval ``[start, end]`` of those steps
and a byte size. ``place`` gives each buffer an offset so that no two buffers alive at the same
step overlap; the arena is one ``uint8`` allocation of the highest end offset, made once and
reused by every step. Buffers are views into it, so what the plan says is what the process uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALIGN = 64  # bytes; cache-line aligned views keep SIMD loads aligned

# Categories, in the order the plan prints them. The first three are the paper's backward memory.
WEIGHTS = "weights being updated"
GRADIENTS = "gradients + optimizer state"
SAVED = "activations saved for backward"
TRANSIENT = "transient buffers"
CATEGORIES = (WEIGHTS, GRADIENTS, SAVED, TRANSIENT)
BACKWARD_MEMORY = (WEIGHTS, GRADIENTS, SAVED)


@dataclass
class Buffer:
    """One planned allocation: alive from step ``start`` to step ``end`` inclusive."""

    name: str
    category: str
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int
    end: int
    offset: int = -1

    @property
    def nbytes(self) -> int:
        """The buffer's size in bytes (elements x itemsize)."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def padded(self) -> int:
        """Bytes it occupies in the arena: nbytes rounded up to ``ALIGN`` (at least one block)."""
        return -(-max(self.nbytes, 1) // ALIGN) * ALIGN

    def alive_at(self, step: int) -> bool:
        """True when the buffer must hold its contents at ``step`` (start <= step <= end)."""
        return self.start <= step <= self.end

    def overlaps_in_time(self, other: "Buffer") -> bool:
        """True when both are alive at some common step, so they cannot share arena bytes."""
        return self.start <= other.end and other.start <= self.end


def place(buffers: list[Buffer]) -> int:
    """First-fit placement, largest (then longest-lived) buffers first. Returns the arena size.

    For each buffer, the buffers already placed that are alive at some common step are the only
    obstacles; it takes the lowest aligned offset that fits in a gap between them.
    """
    order = sorted(buffers, key=lambda b: (-b.padded, b.start - b.end, b.name))
    placed: list[Buffer] = []
    size = 0
    for buf in order:
        obstacles = sorted((p for p in placed if p.overlaps_in_time(buf)), key=lambda p: p.offset)
        offset = 0
        for p in obstacles:
            if offset + buf.padded <= p.offset:
                break
            offset = max(offset, p.offset + p.padded)
        buf.offset = offset
        placed.append(buf)
        size = max(size, offset + buf.padded)
    return size


class Plan:
    """Buffers with lifetimes, the step names, and (placed on first use) their arena offsets."""

    def __init__(self, buffers: list[Buffer], step_names: list[str]):
        self.buffers, self.step_names = buffers, step_names
        self._arena_bytes: int | None = None
        # Bytes alive per step and category, from a difference array over [start, end].
        live = np.zeros((len(CATEGORIES), len(step_names) + 1), np.int64)
        for b in buffers:
            row = CATEGORIES.index(b.category)
            live[row, b.start] += b.nbytes
            live[row, b.end + 1] -= b.nbytes
        self._live = np.cumsum(live, axis=1)[:, :len(step_names)]

    @property
    def arena_bytes(self) -> int:
        """The arena size in bytes after first-fit placement (``place``, run on first use)."""
        if self._arena_bytes is None:
            self._arena_bytes = place(self.buffers)
        return self._arena_bytes

    def live_bytes(self, step: int, categories=CATEGORIES) -> int:
        """Bytes of the buffers of ``categories`` alive at ``step`` (unpadded)."""
        return int(sum(self._live[CATEGORIES.index(c), step] for c in categories))

    def by_category(self, step: int) -> dict[str, int]:
        """Bytes alive at ``step``, per category (``CATEGORIES``)."""
        return {c: self.live_bytes(step, (c,)) for c in CATEGORIES}

    @property
    def peak_step(self) -> int:
        """The step with the most bytes alive (the first, on a tie); 0 for an empty plan."""
        return int(np.argmax(self._live.sum(axis=0))) if self.step_names else 0

    @property
    def peak_live_bytes(self) -> int:
        """The lower bound any placement needs: the most bytes alive at one step."""
        return self.live_bytes(self.peak_step)

    @property
    def backward_bytes(self) -> int:
        """The paper's backward-pass memory at its peak: weights being updated, their gradients
        and optimizer state, and activations kept for backward (transient buffers excluded)."""
        rows = [CATEGORIES.index(c) for c in BACKWARD_MEMORY]
        return int(self._live[rows].sum(axis=0).max(initial=0))

    def category_bytes(self, category: str) -> int:
        """Most bytes of one category alive at any step."""
        return int(self._live[CATEGORIES.index(category)].max(initial=0))

    @property
    def naive_bytes(self) -> int:
        """What the same buffers take with no reuse at all (every one its own allocation)."""
        return sum(b.nbytes for b in self.buffers)

    def views(self, arena: np.ndarray | None) -> dict[str, np.ndarray]:
        """Each buffer as an array: a view into ``arena``, or its own allocation when None."""
        out = {}
        for b in self.buffers:
            if arena is None:
                out[b.name] = np.zeros(b.shape, b.dtype)
            else:
                raw = arena[b.offset:b.offset + b.nbytes]
                out[b.name] = raw.view(b.dtype).reshape(b.shape)
        return out

    def table(self, verbose: bool = False) -> str:
        """The printable plan: arena size, per-category peaks, and optionally every buffer."""
        kib = lambda n: f"{n / 1024:10.1f} KiB"  # noqa: E731
        peak = self.peak_step
        lines = [f"arena: {kib(self.arena_bytes)}  (one allocation; most alive at one step: "
                 f"{kib(self.peak_live_bytes).strip()} at step {peak} '{self.step_names[peak] if self.step_names else '-'}')"]
        at_peak = self.by_category(peak)
        for c in CATEGORIES:
            lines.append(f"  {c:<32} {kib(self.category_bytes(c))} max   {kib(at_peak[c])} at arena peak")
        lines.append(f"  {'backward memory (first three)':<32} {kib(self.backward_bytes)}")
        lines.append(f"  {'no reuse (every buffer its own)':<32} {kib(self.naive_bytes)}")
        if verbose:
            lines.append(f"  {'buffer':<40} {'category':<31} {'shape':<20} {'bytes':>9} {'offset':>9}  steps")
            for b in sorted(self.buffers, key=lambda b: (b.offset, b.start)):
                lines.append(f"  {b.name:<40} {b.category:<31} {str(b.shape):<20} {b.nbytes:>9} "
                             f"{b.offset:>9}  {b.start}-{b.end}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
