"""The budget guard of a render: which node may start, what is committed, when to stop.

Pure bookkeeping, no Ray: ``pipeline.dag`` asks it before submitting a node, tells it what each
running node has cost so far and when a node is charged or finishes. A node is admitted only
while

    spent + Σ committed of nodes in flight + its estimate × its stage's margin  ≤  budget

* ``spent``: what this render has paid, plus — when the budget is the episode's, the default —
  what earlier renders of the episode paid (``spent=`` at construction);
* a node in flight is committed at the larger of its reservation (its estimate × margin at
  admission) and what it has cost so far (``accrue``);
* a stage's margin is 1 + ``margin`` until the stage has been measured, then the larger of
  that and 1.1 × the stage's actual/estimate ratio: Σ actual / Σ estimate over its finished
  nodes, in this render and (``history=``) on this cluster's earlier renders of the episode — a
  sum, not the worst node, since the smallest nodes (a 30 ms panel) are mostly fixed overhead
  and one of them can run many times its estimate. A stage not measured yet takes the ratio of
  every measured stage together (the machine is that much slower than its rows).

Reservations keep a render inside its budget on average; they cannot stop a node that runs
longer than its reservation. ``over(ahead)`` catches that: it says when what is spent plus what
running nodes have cost so far, plus ``ahead`` (what they will cost while they are being
stopped), reaches the budget — the executor then cancels them and bills their partial time.
"""
from __future__ import annotations

from collections.abc import Hashable

EPS = 1e-15  # float slack: a render whose estimate equals the budget exactly fits


class BudgetGuard:
    """Admission control for one render. ``budget_yuan=None``: no cap, every node fits."""

    def __init__(self, budget_yuan: float | None, margin: float = 0.25, *, spent: float = 0.0,
                 history: dict[str, tuple[float, float]] | None = None):
        if budget_yuan is not None and budget_yuan < 0:
            raise ValueError(f"budget_yuan={budget_yuan}: must be >= 0")
        if margin < 0:
            raise ValueError(f"margin={margin}: must be >= 0")
        if spent < 0:
            raise ValueError(f"spent={spent}: must be >= 0")
        self.budget_yuan = budget_yuan
        self.base = 1.0 + margin
        self.spent = spent
        # stage -> [Σ actual, Σ estimate] of its finished nodes (history first)
        self._seen: dict[str | None, list[float]] = {k: [a, e] for k, (a, e) in (history or {}).items() if e > 0}
        self._reserved: dict[Hashable, float] = {}
        self._planned: dict[Hashable, tuple[str | None, float]] = {}  # node -> (stage, plain estimate)
        self._accrued: dict[Hashable, float] = {}  # running node -> what it has cost so far

    @property
    def capped(self) -> bool:
        return self.budget_yuan is not None

    # ---- margins
    def ratio(self, stage: str | None = None) -> float | None:
        """Σ actual / Σ estimate of ``stage``'s finished nodes (of every stage: None), if any."""
        parts = [self._seen[stage]] if stage is not None else list(self._seen.values())
        if stage is not None and stage not in self._seen:
            return None
        actual, planned = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return actual / planned if planned > 0 else None

    @property
    def ratios(self) -> dict[str | None, float]:
        return {stage: a / e for stage, (a, e) in self._seen.items()}

    @property
    def margin(self) -> float:
        """The margin of a stage not measured yet: from every measured stage together."""
        r = self.ratio()
        return self.base if r is None else max(self.base, 1.1 * r)

    def margin_for(self, stage: str | None) -> float:
        r = self.ratio(stage) if stage in self._seen else None
        return self.margin if r is None else max(self.base, 1.1 * r)

    def known(self, stage: str | None) -> bool:
        """Whether ``stage``'s actual/estimate ratio has been measured (here or in history)."""
        return stage in self._seen

    def reservation(self, node: Hashable) -> float:
        return self._reserved.get(node, 0.0)

    # ---- what is committed
    @property
    def reserved(self) -> float:
        """Σ over nodes in flight of max(reservation, cost so far)."""
        nodes = set(self._reserved) | set(self._accrued)
        return sum(max(self._reserved.get(n, 0.0), self._accrued.get(n, 0.0)) for n in nodes)

    @property
    def accrued(self) -> float:
        return sum(self._accrued.values())

    def fits(self, yuan: float, stage: str | None = None, *, keep: float = 0.0) -> bool:
        """Whether a node estimated at ``yuan`` (of ``stage``) may start now, ``keep`` yuan left over."""
        return self.fits_all([(yuan, stage)], keep=keep)

    def fits_all(self, nodes: list[tuple[float, str | None]], *, keep: float = 0.0) -> bool:
        """Whether nodes estimated at (yuan, stage) each may start now, together, leaving ``keep``
        yuan of the budget untouched (what stopping the running nodes would cost)."""
        if self.budget_yuan is None:
            return True
        cost = sum(yuan * self.margin_for(stage) for yuan, stage in nodes)
        return self.spent + self.reserved + cost + keep <= self.budget_yuan + EPS

    def overcommitted(self) -> bool:
        """Spent plus what is committed to nodes in flight passes the budget: some of them must go."""
        return self.budget_yuan is not None and self.spent + self.reserved > self.budget_yuan + EPS

    def over(self, ahead: float = 0.0) -> bool:
        """Spent plus what running nodes have cost so far, plus ``ahead``, reaches the budget."""
        return self.budget_yuan is not None and self.spent + self.accrued + ahead >= self.budget_yuan - EPS

    # ---- a node's life
    def reserve(self, node: Hashable, estimate: float, *, stage: str | None = None, learn: bool = True) -> None:
        """Hold ``estimate`` × the stage's margin for a node until it finishes. With ``learn``, its
        actual cost at ``finish`` teaches its stage's margin (shared prerequisites, priced per
        episode, do not)."""
        self._reserved[node] = estimate * self.margin_for(stage)
        if learn:
            self._planned[node] = (stage, estimate)
        else:
            self._planned.pop(node, None)

    def accrue(self, node: Hashable, yuan: float) -> None:
        """What a running node has cost so far (its reservation still holds if it is larger)."""
        self._accrued[node] = yuan

    def charge(self, yuan: float) -> None:
        """Measured cost of a finished node (or of a node that ran without a reservation)."""
        self.spent += yuan

    def finish(self, node: Hashable, actual: float) -> None:
        """A node finished at ``actual`` yuan (already charged): release its reservation, learn."""
        self._reserved.pop(node, None)
        self._accrued.pop(node, None)
        stage, estimate = self._planned.pop(node, (None, 0.0))
        if estimate > 0:
            seen = self._seen.setdefault(stage, [0.0, 0.0])
            seen[0] += actual
            seen[1] += estimate

    def release(self, node: Hashable) -> None:
        """Drop a reservation without learning from it (a node cancelled, or taken as a hit)."""
        self._reserved.pop(node, None)
        self._accrued.pop(node, None)
        self._planned.pop(node, None)
