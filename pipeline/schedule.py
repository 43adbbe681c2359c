"""RenderPlan + store + approvals + stop point + budget → Schedule. Pure: no Ray, no clocks;
the store is only read (does an intact artifact exist under this key?).

A schedule lists every node a render would touch, in the order the executor submits them,
each with its content key, its inputs, its estimate and one state:

* ``hit`` — its artifact is in the store (or it is not needed because its output's consumer
  is): it costs ¥0 and is recorded as a cached ledger row;
* ``run`` — it must be computed, and it fits the budget on estimates;
* ``held`` — not this render, with the reason: ``storyboard`` (the stop point),
  ``approval`` (its storyboard panel is not approved while the gate is on), ``budget``
  (it does not fit on estimates; the executor still admits it if actual costs leave room),
  ``inputs`` (something it needs is held).

Nodes per shot: ``storyboard`` → ``keyframes`` → ``clip`` (in-betweens + encode); per
layered keyframe backend: one ``plates`` node per location and one ``sheets`` node per
character, before the keyframes that need them; per episode: ``assemble`` when every clip
exists or runs, else the ``contact_sheet`` alone.

Budget admission on estimates (``pipeline.budget.BudgetGuard``, estimates × margin), after
``spent_yuan`` (what the episode has spent already, when the budget is the episode's): all
storyboards and the contact sheet or none — the contact sheet is reserved first, so a render
that stops for budget still delivers it — then each shot's chain (its keyframes, clip and the
plates and sheets it needs first), longest first so no shot is left as an idle tail; then the
episode node (assemble in place of the contact sheet when every clip exists or runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from pipeline.budget import BudgetGuard
from pipeline.models import RenderPlan, ShotPlan

SHOT_STAGES = ("storyboard", "keyframes", "clip")
# The ledger stages each node bills: its timings, or its cached rows on a hit.
LEDGER_STAGES = {"storyboard": ("storyboard",), "keyframes": ("keyframes", "audit"),
                 "clip": ("inbetween", "encode", "audit"), "plates": ("plates",), "sheets": ("sheets",),
                 "voice": ("voice",), "assemble": ("assemble", "mix", "subtitles"), "contact_sheet": ("storyboard",)}
State = Literal["hit", "run", "held"]


@dataclass(frozen=True, order=True)
class NodeId:
    """One node of the render graph: a stage and what it is for (a shot id, a plate key, a
    character name), or nothing for the episode-level nodes."""

    stage: str
    item: str | None = None

    @property
    def shot(self) -> str | None:
        """The shot a ledger row of this node belongs to (None for episode-level nodes)."""
        if self.stage == "voice" and self.item:
            return self.item.split("#", 1)[0]  # '<shot>#<line>'
        return self.item if self.stage in SHOT_STAGES else None

    def __str__(self) -> str:
        return f"{self.stage}[{self.item}]" if self.item else self.stage


@dataclass(frozen=True)
class Node:
    id: NodeId
    key: str
    state: State
    reason: str | None = None  # why a node is held
    estimate_yuan: float = 0.0
    estimate_seconds: float = 0.0
    inputs: tuple[NodeId, ...] = ()

    @property
    def ledger_stages(self) -> tuple[str, ...]:
        return LEDGER_STAGES[self.id.stage]


@dataclass(frozen=True)
class Schedule:
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {n.id: n for n in self.nodes})

    def __getitem__(self, node: NodeId) -> Node:
        return self._by_id[node]  # type: ignore[attr-defined]

    def get(self, node: NodeId) -> Node | None:
        return self._by_id.get(node)  # type: ignore[attr-defined]

    def where(self, state: State, stage: str | None = None) -> list[Node]:
        return [n for n in self.nodes if n.state == state and stage in (None, n.id.stage)]

    @property
    def estimate_yuan(self) -> float:
        """What the nodes that run would cost on estimates."""
        return sum(n.estimate_yuan for n in self.where("run"))

    @property
    def shots_to_render(self) -> list[str]:
        """Shots whose clip runs."""
        return [n.id.item for n in self.where("run", "clip")]

    @property
    def finish(self) -> NodeId:
        """The episode-level node this render ends with: assemble, or the contact sheet alone."""
        return NodeId("assemble") if self.get(NodeId("assemble")) else NodeId("contact_sheet")

    @property
    def stopped(self) -> str | None:
        """Why this render will not deliver the episode (None: it will)."""
        held = [n.reason for n in self.where("held")]
        for reason in ("budget", "approval", "storyboard"):
            if reason in held:
                return reason
        return None

    def held_shots(self) -> list[str]:
        """Shots whose clip this render will not produce, as planned."""
        return [n.id.item for n in self.where("held", "clip")]


class Lookup(Protocol):
    def get(self, key: str) -> object | None: ...


def schedule(plan: RenderPlan, store: Lookup, *, approvals: set[str] | None = None,
             stop_after: str | None = None, budget_yuan: float | None = None,
             margin: float = 0.25, spent_yuan: float = 0.0) -> Schedule:
    """Which nodes are hits, which run and which are held back, each with its estimate.

    ``approvals``: the approved storyboard keys, or None when the approval gate is off.
    ``stop_after="storyboard"``: storyboards and the contact sheet only.
    ``spent_yuan``: already spent against ``budget_yuan`` (the episode's earlier renders).
    """
    if stop_after not in (None, "storyboard"):
        raise ValueError(f"stop_after={stop_after!r}: the only stop is 'storyboard'")
    stored = _Stored(store)
    guard = BudgetGuard(budget_yuan, margin, spent=spent_yuan)
    # 1. Storyboards: every panel, or none when they do not fit together.
    boards = _storyboards(plan, stored, guard)
    broke = any(n.reason == "budget" for n in boards)
    # 2. Each shot's chain, held back for a reason or wanted; the wanted ones admitted by budget.
    chains = {s.shot.id: _chain(plan, s, stored, "budget" if broke else _hold_reason(s, stop_after, approvals))
              for s in plan.shots}
    prereqs = _admit(plan, chains, stored, guard)
    # 3. The voices, once the chains are admitted: what the assembly needs besides the clips.
    voices = _voices(plan, stored, guard, broke)
    # 4. The episode node: the whole episode when every clip exists or runs, else the contact sheet.
    clips = [chains[s.shot.id][1] for s in plan.shots]
    if all(c.state != "held" for c in clips + voices):
        guard.release("contact_sheet")  # the episode carries its own contact sheet
        last = _episode_node(plan, "assemble", plan.assemble_key, [c.id for c in clips + voices], stored, guard)
    else:
        last = _episode_node(plan, "contact_sheet", plan.contact_sheet_key, [b.id for b in boards], stored,
                             guard, blocked=broke)
    return Schedule([*boards, *voices, *prereqs, *(n for s in plan.shots for n in chains[s.shot.id]), last])


def voice_schedule(plan: RenderPlan, store: Lookup) -> Schedule:
    """The voice nodes alone: what a render speaks first, so that the cut can follow the voice."""
    return Schedule(_voices(plan, _Stored(store), BudgetGuard(None, 0.0), False))


def _storyboards(plan: RenderPlan, stored: _Stored, guard: BudgetGuard) -> list[Node]:
    """Every panel and the contact sheet, reserved together, or every panel held for budget."""
    boards = [_node(plan, s, "storyboard", stored) for s in plan.shots]
    cost = sum(n.estimate_yuan for n in boards if n.state == "run")
    sheet = 0.0 if stored(plan.contact_sheet_key) else contact_sheet_estimate(plan)
    if not guard.fits(cost + sheet):
        return [_held(n, "budget") for n in boards]
    guard.reserve("storyboards", cost)
    guard.reserve("contact_sheet", sheet)
    return boards


def _voices(plan: RenderPlan, stored: _Stored, guard: BudgetGuard, broke: bool) -> list[Node]:
    """Every line's voice node: cheap, and what the cut is timed by, so admitted with the
    storyboards or held with them."""
    nodes = [Node(NodeId("voice", v.id), v.key, "hit" if stored(v.key) else "run", estimate_yuan=v.estimate_yuan,
                  estimate_seconds=v.estimate_seconds) for v in plan.voices]
    cost = sum(n.estimate_yuan for n in nodes if n.state == "run")
    if broke or not guard.fits(cost):
        return [_held(n, "budget") for n in nodes]
    guard.reserve("voices", cost)
    return nodes


def contact_sheet_estimate(plan: RenderPlan) -> float:
    """The contact sheet is estimated as one more storyboard panel."""
    return plan.shots[0].estimate_yuan["storyboard"] if plan.shots else 0.0


def _hold_reason(shot: ShotPlan, stop_after: str | None, approvals: set[str] | None) -> str | None:
    if stop_after == "storyboard":
        return "storyboard"
    if approvals is not None and shot.keys["storyboard"] not in approvals:
        return "approval"
    return None


def _chain(plan: RenderPlan, shot: ShotPlan, stored: _Stored, reason: str | None) -> list[Node]:
    """[keyframes, clip] of a shot: both free when the clip is stored, else both held for ``reason``."""
    kf, clip = _node(plan, shot, "keyframes", stored), _node(plan, shot, "clip", stored)
    if clip.state == "hit":
        return [_as_hit(kf), clip]
    return [_held(kf, reason), _held(clip, reason)]


def _admit(plan: RenderPlan, chains: dict[str, list[Node]], stored: _Stored, guard: BudgetGuard) -> list[Node]:
    """Admit the wanted chains longest first while they fit, each with the plates and sheets it
    needs first (a plate shared by two chains is paid by the first); hold the rest for budget.
    Returns the plate and sheet nodes, in the order they are needed."""
    prereqs: dict[NodeId, Node] = {}
    wanted = [s for s in plan.shots if chains[s.shot.id][1].state == "run"]
    for shot in sorted(wanted, key=lambda s: -sum(s.estimate_seconds.values())):
        chain = chains[shot.shot.id]
        needs = _prerequisites(plan, shot, stored, chain[0])
        admitted = {i for i, p in prereqs.items() if p.state == "run"}
        new = [p for p in needs if p.state == "run" and p.id not in admitted]
        cost = sum(n.estimate_yuan for n in new + chain if n.state == "run")
        if guard.fits(cost):
            guard.reserve(shot.shot.id, cost)
            prereqs.update({p.id: p for p in needs if p.id not in admitted})
        else:
            chains[shot.shot.id] = [_held(n, "budget") for n in chain]
            for p in needs:
                prereqs.setdefault(p.id, _held(p, "budget"))
    return list(prereqs.values())


class _Stored:
    """The store's answer per key, asked once per schedule (a lookup checksums the files)."""

    def __init__(self, store: Lookup):
        self.store, self.seen = store, {}

    def __call__(self, key: str) -> bool:
        if key not in self.seen:
            self.seen[key] = self.store.get(key) is not None
        return self.seen[key]


def _estimate(shot: ShotPlan, stage: str, what: str = "yuan") -> float:
    est = shot.estimate_yuan if what == "yuan" else shot.estimate_seconds
    return sum(est.get(s, 0.0) for s in LEDGER_STAGES[stage] if s != "audit" or stage == "keyframes")


def _node(plan: RenderPlan, shot: ShotPlan, stage: str, stored: _Stored) -> Node:
    key = shot.keys[stage]
    inputs = {"storyboard": (), "keyframes": (NodeId("storyboard", shot.shot.id),),
              "clip": (NodeId("keyframes", shot.shot.id),)}[stage]
    return Node(NodeId(stage, shot.shot.id), key, "hit" if stored(key) else "run",
                estimate_yuan=_estimate(shot, stage), estimate_seconds=_estimate(shot, stage, "seconds"),
                inputs=inputs)


def prerequisites(plan: RenderPlan, shot: ShotPlan) -> list[NodeId]:
    """The plate and sheets a shot's keyframes read (layered keyframe backends)."""
    if "plate" not in shot.keys:
        return []
    wanted = [NodeId("plates", shot.keys["plate"])] + [NodeId("sheets", plan.sheets[n]) for n in shot.shot.characters]
    return list(dict.fromkeys(wanted))


def _prerequisites(plan: RenderPlan, shot: ShotPlan, stored: _Stored, keyframes: Node) -> list[Node]:
    """The plate and sheets a shot's keyframes read (layered backends), when its keyframes run."""
    if keyframes.state != "run":
        return []
    out = []
    for node in prerequisites(plan, shot):
        stage, key = node.stage, node.item
        count = len(plan.plates) if stage == "plates" else len(plan.sheets)
        yuan = plan.episode_estimate_yuan.get(stage, 0.0) / max(count, 1)
        seconds = plan.episode_estimate_seconds.get(stage, 0.0) / max(count, 1)
        out.append(Node(node, key, "hit" if stored(key) else "run", estimate_yuan=yuan,
                        estimate_seconds=seconds))
    return out


def _episode_node(plan: RenderPlan, stage: str, key: str, inputs: list[NodeId], stored: _Stored,
                  guard: BudgetGuard, blocked: bool = False) -> Node:
    yuan = plan.assemble_estimate_yuan if stage == "assemble" else contact_sheet_estimate(plan)
    node = Node(NodeId(stage), key, "hit" if stored(key) else "run", estimate_yuan=yuan, inputs=tuple(inputs))
    if node.state == "run" and blocked:
        return _held(node, "inputs")
    if node.state == "run" and stage == "assemble" and not guard.fits(yuan):
        return _held(node, "budget")
    return node  # the contact sheet was reserved with the storyboards


def _held(node: Node, reason: str | None) -> Node:
    if reason is None or node.state == "hit":
        return node
    return Node(node.id, node.key, "held", reason, node.estimate_yuan, node.estimate_seconds, node.inputs)


def _as_hit(node: Node) -> Node:
    """A node whose consumer is in the store is not needed: ¥0, like a hit."""
    return Node(node.id, node.key, "hit", None, node.estimate_yuan, node.estimate_seconds, node.inputs)


def schedule_summary(sched: Schedule) -> dict:
    """The ``schedule`` part of ``anim plan --json``: what a render would recompute now."""
    return {"shots_to_render": sched.shots_to_render, "estimated_cost_yuan": sched.estimate_yuan,
            "stopped": sched.stopped,
            "nodes": [{"node": str(n.id), "stage": n.id.stage, "item": n.id.item, "state": n.state,
                       "reason": n.reason, "estimated_cost_yuan": n.estimate_yuan} for n in sched.nodes]}
