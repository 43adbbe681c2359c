"""Producer decisions on storyboard panels: approve or reject, with who, when and why.

Decisions are records, not cache. They live in a small database of their own — a SQLite file
by default (``~/.local/share/anim-pipeline/approvals.db``; setting ``approvals``,
``ANIM_APPROVALS``), any SQLAlchemy URL for a team (``postgresql://…`` for the render
service) — never in the artifact store, so ``anim cache gc`` cannot delete one. Every
decision is kept; the latest per key wins.

A decision is keyed by what the producer judged: the shot's content (what
``pipeline.plan.shot_content`` hashes: camera, duration, characters, action, dialogue,
location, time of day; not the transitions written around it, which the drawings do not
show) and the aspect, which fixes the composition (the camera framing follows the shot). Not
the panel width, the profile, the keyframe backend or the GPU: a panel approved at draft stays
approved at standard and on a GPU profile, and after a dissolve is written after the
shot; edit the shot's action and it needs a new decision.

The gate (``gate_on``) is on by default for a profile whose keyframes cost GPU money, off
otherwise; the profile's ``approval_gate`` and then ``--approval-gate/--no-approval-gate``
override that. With the gate on, only approved shots get keyframes; a rejected shot is held
back like a pending one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

from pydantic import Field

from pipeline.models import Profile, RenderPlan, ShotPlan
from pipeline.plan import content_key, drawn_content, shot_content
from stages.records import AnimError, Record

VERSION = "2"  # 1: an entry in the artifact store per storyboard key
SCHEMA_VERSION = 1
Choice = Literal["approved", "rejected"]
State = Literal["approved", "rejected", "pending"]


class ApprovalError(AnimError):
    """A decision that cannot be recorded or read; the message says what was left as it was."""


class Decision(Record):
    """One producer decision on one shot's storyboard panel."""

    schema_version: int = SCHEMA_VERSION
    key: str = Field(description="approval_key: the shot's content and aspect.")
    shot: str = Field(description="The shot id in the script it was decided on.")
    title: str = Field(description="Episode title.")
    script_sha256: str
    profile: str = Field(description="The profile the panel was shown at.")
    decision: Choice
    by: str
    at: datetime = Field(description="When, in UTC.")
    comment: str = ""
    storyboard_key: str = Field(description="Content key of the panel the producer was shown.")


def approval_key(shot: ShotPlan, aspect: str) -> str:
    """What a decision follows: what the shot's drawings show and the aspect (not panel width,
    profile, keyframe backend or GPU, nor a transition written around the shot: a dissolve
    edited in later keeps the panel's approval)."""
    return _key(drawn_content(shot.shot, shot.scene), aspect)


def earlier_key(shot: ShotPlan, aspect: str) -> str:
    """The key a decision on a shot with transitions was kept under before transitions left the
    key (the shot's whole content): such decisions still hold."""
    return _key(shot_content(shot.shot, shot.scene), aspect)


def _key(content: dict, aspect: str) -> str:
    return content_key("approval", VERSION, {"aspect": aspect},
                       [json.dumps(content, sort_keys=True, ensure_ascii=False)])


def gate_on(profile: Profile, flag: bool | None = None) -> bool:
    """Whether unapproved shots are held back: ``flag`` (``--approval-gate/--no-approval-gate``)
    if given, else the profile's ``approval_gate`` if set, else whether keyframes run on GPUs."""
    if flag is not None:
        return flag
    if profile.approval_gate is not None:
        return profile.approval_gate
    return profile.resources("keyframes").gpus > 0


def decide(plan: RenderPlan, shots: Sequence[ShotPlan], decision: Choice, *, by: str, comment: str = "",
           at: datetime | None = None) -> list[Decision]:
    """The records of one decision on ``shots`` of ``plan`` (the panels at ``plan``'s profile).
    A rejection says why: it needs a comment."""
    by, comment = by.strip(), comment.strip()
    if not by:
        raise ApprovalError("a decision needs who made it (--by NAME)")
    if decision == "rejected" and not comment:
        raise ApprovalError("a rejection needs a comment saying what to change (--comment TEXT); nothing recorded")
    at = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return [Decision(key=approval_key(s, plan.profile.aspect), shot=s.shot.id, title=plan.title,
                     script_sha256=plan.script_sha256, profile=plan.profile.name, decision=decision, by=by,
                     at=at, comment=comment, storyboard_key=s.keys["storyboard"]) for s in shots]


# --------------------------------------------------------------------------- the database


class ApprovalBook(Protocol):
    """Where decisions are kept: the render service swaps in its own database behind this."""

    location: str

    def record(self, decisions: Sequence[Decision]) -> None:
        """Append ``decisions`` (all or none)."""

    def latest(self, keys: Iterable[str]) -> dict[str, Decision]:
        """The latest decision per key, for the keys that have one."""

    def history(self, keys: Iterable[str] | None = None) -> list[Decision]:
        """Every decision on ``keys`` (all keys: None), oldest first."""


class SqlApprovals:
    """An ``ApprovalBook`` in one SQL table, through SQLAlchemy: SQLite by default, PostgreSQL
    for a team. Rows are only ever inserted; the latest row per key (highest id) wins."""

    _CHUNK = 500  # keys per IN (…) query, under every database's bound-parameter limit

    def __init__(self, url: str, location: str | None = None, path: Path | None = None):
        """``path``: the SQLite file of a path location. It (and its folder) is created by the
        first decision recorded: until then reads find no decisions, so ``anim plan`` writes nothing.
        A database URL is connected to here, so a wrong one fails before any work."""
        import sqlalchemy as sa

        self._sa, self._path, self._ready = sa, path, False
        self._meta = meta = sa.MetaData()
        self._table = sa.Table(
            "approval_decisions", meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("schema_version", sa.Integer, nullable=False),
            sa.Column("key", sa.String(64), nullable=False, index=True),
            sa.Column("shot", sa.String(200), nullable=False),
            sa.Column("title", sa.Text, nullable=False),
            sa.Column("script_sha256", sa.String(64), nullable=False),
            sa.Column("profile", sa.Text, nullable=False),
            sa.Column("decision", sa.String(16), nullable=False),
            sa.Column("by", sa.Text, nullable=False),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("comment", sa.Text, nullable=False),
            sa.Column("storyboard_key", sa.String(64), nullable=False),
            sa.CheckConstraint("decision IN ('approved', 'rejected')", name="decision_is_a_choice"))
        try:  # never show a password in a message or in config.json
            self.location = location or sa.engine.make_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            raise ApprovalError(f"approvals database {url.split('://')[0]}://…: not a database URL "
                                "(e.g. sqlite:///path/approvals.db, postgresql://host/db) or a file path") from None
        try:
            connect = {"timeout": 30} if url.startswith("sqlite") else {}
            self._engine = sa.create_engine(url, connect_args=connect)
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            raise ApprovalError(f"approvals database {self.location}: cannot open it: {_reason(exc)}") from None
        if path is None:
            self._ensure()

    def _ensure(self) -> None:
        """The table exists (created, with the SQLite file's folder, if need be)."""
        if self._ready:
            return
        try:
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            self._meta.create_all(self._engine)
        except OSError as exc:
            raise ApprovalError(f"approvals database {self.location}: cannot create its folder: "
                                f"{exc.strerror or exc}") from None
        except self._sa.exc.SQLAlchemyError as exc:
            raise ApprovalError(f"approvals database {self.location}: cannot open it: {_reason(exc)}") from None
        self._ready = True

    def record(self, decisions: Sequence[Decision]) -> None:
        rows = [d.model_dump() | {"at": d.at.astimezone(timezone.utc)} for d in decisions]
        if not rows:
            return
        self._ensure()
        try:
            with self._engine.begin() as conn:
                conn.execute(self._table.insert(), rows)
        except self._sa.exc.SQLAlchemyError as exc:
            raise ApprovalError(f"approvals database {self.location}: {_reason(exc)}; nothing was recorded") from None

    def latest(self, keys: Iterable[str]) -> dict[str, Decision]:
        t, sa = self._table, self._sa
        out: dict[str, Decision] = {}
        for chunk in _chunks(list(dict.fromkeys(keys)), self._CHUNK):
            newest = sa.select(sa.func.max(t.c.id)).where(t.c.key.in_(chunk)).group_by(t.c.key)
            out.update((d.key, d) for _, d in self._select(t.c.id.in_(newest)))
        return out

    def history(self, keys: Iterable[str] | None = None) -> list[Decision]:
        if keys is None:
            return [d for _, d in self._select(None)]
        rows = [row for chunk in _chunks(list(dict.fromkeys(keys)), self._CHUNK)
                for row in self._select(self._table.c.key.in_(chunk))]
        return [d for _, d in sorted(rows, key=lambda row: row[0])]

    def _select(self, where) -> list[tuple[int, Decision]]:
        """(row id, decision) of the rows ``where`` selects (all: None), by id."""
        t, sa = self._table, self._sa
        if self._path is not None and not self._ready and not self._path.exists():
            return []  # no decision recorded yet
        self._ensure()
        query = sa.select(t).order_by(t.c.id)
        if where is not None:
            query = query.where(where)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(query).mappings().all()
        except sa.exc.SQLAlchemyError as exc:
            raise ApprovalError(f"approvals database {self.location}: cannot read it: {_reason(exc)}") from None
        out = []
        for row in rows:
            data = {k: v for k, v in row.items() if k != "id"}
            if data["schema_version"] > SCHEMA_VERSION:
                raise ApprovalError(f"approvals database {self.location}: row {row['id']} has schema version "
                                    f"{data['schema_version']}, newer than this code ({SCHEMA_VERSION})")
            at = data["at"]
            data["at"] = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
            out.append((row["id"], Decision(**data)))
        return out


def open_approvals(location: str | Path) -> SqlApprovals:
    """The approvals database at ``location``: a file path (SQLite, created with its folder by the
    first decision) or a SQLAlchemy URL (``sqlite:///…``, ``postgresql://…``)."""
    text = str(location).strip()
    if not text:
        raise ApprovalError(f"an approvals database needs a location: a path or a database URL, got {location!r}")
    if "://" in text:
        return SqlApprovals(text)
    path = Path(text).expanduser().absolute()
    return SqlApprovals(f"sqlite:///{path}", location=str(path), path=path)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


# --------------------------------------------------------------------------- a plan against the gate


@dataclass(frozen=True)
class ShotApproval:
    shot: str
    key: str
    storyboard_key: str  # the panel at this plan's profile
    latest: Decision | None

    @property
    def state(self) -> State:
        return self.latest.decision if self.latest else "pending"


@dataclass(frozen=True)
class GateState:
    """Every shot of a plan with its latest decision, and whether the gate holds them back."""

    gate: bool
    shots: list[ShotApproval]

    @property
    def approvals(self) -> set[str] | None:
        """What ``schedule(approvals=…)`` takes: the approved shots' storyboard keys at this
        plan's profile, or None when the gate is off."""
        if not self.gate:
            return None
        return {s.storyboard_key for s in self.shots if s.state == "approved"}

    def counts(self) -> dict[State, int]:
        states = [s.state for s in self.shots]
        return {state: states.count(state) for state in ("approved", "rejected", "pending")}

    def __getitem__(self, shot_id: str) -> ShotApproval:
        return next(s for s in self.shots if s.shot == shot_id)

    def tags(self) -> dict[str, str]:
        """MLflow tags of a render: the gate, the counts, and each shot's state."""
        return {"approval_gate": "on" if self.gate else "off",
                **{f"approvals.{state}": str(n) for state, n in self.counts().items()},
                **{f"approval.{s.shot}": s.state for s in self.shots}}

    def summary(self) -> dict:
        """``approvals.json`` of a render and ``approvals`` of ``anim plan --json``."""
        return {"gate": self.gate, "counts": self.counts(),
                "shots": [{"shot": s.shot, "key": s.key, "state": s.state,
                           **({"by": s.latest.by, "at": s.latest.at.isoformat(), "comment": s.latest.comment,
                               "profile": s.latest.profile, "storyboard_key": s.latest.storyboard_key}
                              if s.latest else {})} for s in self.shots]}


def gate_state(book: ApprovalBook, plan: RenderPlan, gate: bool) -> GateState:
    """Each shot of ``plan`` with its latest decision."""
    aspect = plan.profile.aspect
    keys = {s.shot.id: approval_key(s, aspect) for s in plan.shots}
    earlier = {s.shot.id: earlier_key(s, aspect) for s in plan.shots}
    latest = book.latest([*keys.values(), *earlier.values()])
    return GateState(gate, [ShotApproval(s.shot.id, keys[s.shot.id], s.keys["storyboard"],
                                         latest.get(keys[s.shot.id]) or latest.get(earlier[s.shot.id]))
                            for s in plan.shots])


def preview_clips(plan: RenderPlan, store) -> dict[str, Path]:
    """``shot-<id>.mp4`` -> the stored clip of every shot already rendered: what a render that
    stopped (for approval, budget or the storyboard) publishes for the producer to watch."""
    out = {}
    for s in plan.shots:
        files = store.get(s.keys["clip"])
        if files and "clip.mp4" in files:
            out[f"shot-{s.shot.id}.mp4"] = files["clip.mp4"]
    return out
