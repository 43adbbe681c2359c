"""The budget guard of a render: which node may start, given what is spent and what is running.

Pure bookkeeping, no Ray: ``pipeline.dag`` asks it before submitting a node and tells it when
a node is charged or finishes. A node is admitted only while

    spent + Σ reservations of running nodes + its estimate × margin  ≤  budget

Each admitted node reserves its estimate × margin until it finishes; then its measured cost is
charged and the reservation released. The margin starts at ``1 + margin`` and grows to 1.1 ×
the worst actual/estimate ratio seen in this render, so a machine slower than its calibration
tightens the guard instead of overshooting. What it cannot prevent: a node that is already
running when it overruns (nothing interrupts a running node).
"""
from __future__ import annotations

from collections.abc import Hashable

EPS = 1e-15  # float slack: a render whose estimate equals the budget exactly fits


class BudgetGuard:
    """Admission control for one render. ``budget_yuan=None``: no cap, every node fits."""

    def __init__(self, budget_yuan: float | None, margin: float = 0.25):
        if budget_yuan is not None and budget_yuan < 0:
            raise ValueError(f"budget_yuan={budget_yuan}: must be >= 0")
        if margin < 0:
            raise ValueError(f"margin={margin}: must be >= 0")
        self.budget_yuan = budget_yuan
        self.margin = 1.0 + margin
        self.spent = 0.0
        self._reserved: dict[Hashable, float] = {}
        self._planned: dict[Hashable, float] = {}  # running node -> its plain estimate

    @property
    def reserved(self) -> float:
        return sum(self._reserved.values())

    def fits(self, yuan: float) -> bool:
        """Whether a node estimated at ``yuan`` may start now."""
        if self.budget_yuan is None:
            return True
        return self.spent + self.reserved + yuan * self.margin <= self.budget_yuan + EPS

    def reserve(self, node: Hashable, estimate: float, *, learn: bool = True) -> None:
        """Hold ``estimate`` × margin for a node until it finishes. With ``learn``, its actual cost
        at ``finish`` updates the margin (shared prerequisites, priced per episode, do not)."""
        self._reserved[node] = estimate * self.margin
        if learn:
            self._planned[node] = estimate
        else:
            self._planned.pop(node, None)

    def charge(self, yuan: float) -> None:
        """Measured cost of a finished node (or of a node that ran without a reservation)."""
        self.spent += yuan

    def finish(self, node: Hashable, actual: float) -> None:
        """A node finished at ``actual`` yuan (already charged): release its reservation, learn."""
        self._reserved.pop(node, None)
        estimate = self._planned.pop(node, 0.0)
        if estimate > 0:
            self.margin = max(self.margin, 1.1 * actual / estimate)

    def release(self, node: Hashable) -> None:
        """Drop a reservation without learning from it."""
        self._reserved.pop(node, None)
        self._planned.pop(node, None)
