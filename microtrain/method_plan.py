"""What a training method decides before fine-tuning starts: a ``MethodPlan`` under ``Budgets``.

Every method (``methods.py``; TinyTL's in ``tinytl.py``) returns one, and the same engine, planner
and fine-tuning loop run it, so their memory and MACs are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .selection import Selection


@dataclass
class Budgets:
    """The budgets TinyTrain's selection must fit (Algorithm 1); fixed-policy methods ignore them."""

    memory: int  # bytes of backward memory
    macs: int  # backward MACs


@dataclass
class MethodPlan:
    """What one method trains on one task, and what it decided that with."""

    method: str
    selection: Selection
    block_hook: object = None  # graph rewrite of each block (TinyTL)
    choices: list = field(default_factory=list)  # (layer, channels kept, out channels, score)
    seconds: float = 0.0  # time spent deciding (Fisher + selection for TinyTrain)
    momentum: float | None = None  # overrides the fine-tuning momentum (SparseUpdate: plain SGD)
    lr: float = 0.0  # the method's default learning rate, used when the user gives none
    info: dict = field(default_factory=dict)
    row_scales: dict | None = None  # per-channel step multipliers (optim.SGD), TinyTrain+'s preconditioner

    @property
    def trains(self) -> bool:
        """False for a method that trains nothing (None: prototypes only)."""
        return len(self.selection) > 0
