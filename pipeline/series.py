"""A series manifest: which episodes make a series, how they are delivered, what a night may
spend and when the nightly batch runs (``pipeline.nightly``).

A manifest is a TOML file; paths in it are relative to the manifest's folder::

    name = "The Paper Crane Signal"              # the MLflow experiment of every render and night
    episodes = ["../episode_en.fountain",        # paths or globs, in script order; a table gives
                { path = "../episode_zh.fountain", priority = 1, budget_yuan = 0.5 }]
    profiles = ["draft"]                         # built-in names or .toml paths; each one delivered
    aspects = ["16:9"]                           # each one delivered; [] = each profile's own
    episode_budget_yuan = 1.0                    # cap of one render of one episode, per night
    night_cap_yuan = 5.0                         # what a whole night may be estimated to cost
    order = "script"                             # or "priority": higher first, then script order
    results = "../../out/paper-crane"            # where each episode's folder is published

    [schedule]
    cron = "30 2 * * *"                          # when the night starts, in ``timezone``
    timezone = "Asia/Shanghai"
    missed = "latest"                            # after a gap: run the latest missed night once
                                                 # ("skip": only a night still within grace_minutes)
    grace_minutes = 360

A manifest that cannot describe a series is refused with one line naming the file, the line
and the problem, like a bad script (``SeriesError``).
"""
from __future__ import annotations

import glob
import math
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.records import ProfileError, ScriptError

MAX_EPISODES = 1000  # a series runs 60-100 episodes; past this a glob caught far more than meant
ASPECTS = ("16:9", "9:16")
SCRIPT_SUFFIXES = (".fountain", ".yaml", ".yml")


class SeriesError(ScriptError):
    """A series manifest that does not describe a series: names the file, the line and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EpisodeSpec(_Strict):
    path: str = Field(min_length=1, description="A script, or a glob of scripts, relative to the manifest.")
    priority: int = Field(0, description="With order = \"priority\": higher renders first.")
    budget_yuan: float | None = Field(None, ge=0, allow_inf_nan=False, description="This episode's cap per render.")


class ScheduleSpec(_Strict):
    cron: str = Field(description="Five-field cron expression: when a night starts, in ``timezone``.")
    timezone: str = "UTC"
    missed: Literal["latest", "skip"] = Field("latest", description="After nights were missed (the service was "
                                              "down): 'latest' runs the latest of them once, 'skip' runs a night "
                                              "only within grace_minutes of its start. Earlier ones are recorded "
                                              "as missed, never run later.")
    grace_minutes: int = Field(360, ge=0, le=7 * 24 * 60)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a five-field cron expression (minute hour day month weekday), "
                             "e.g. \"30 2 * * *\"")
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as Asia/Shanghai or UTC") from None
        return value


class Manifest(_Strict):
    name: str = Field(min_length=1, max_length=200)
    episodes: list[EpisodeSpec] = Field(min_length=1, description="Paths or globs, or tables with a path.")
    profiles: list[str] = Field(["draft"], min_length=1)
    aspects: list[str] = Field(default_factory=list)
    episode_budget_yuan: float | None = Field(None, ge=0, allow_inf_nan=False)
    night_cap_yuan: float | None = Field(None, ge=0, allow_inf_nan=False)
    order: Literal["script", "priority"] = "script"
    results: str | None = None
    schedule: ScheduleSpec | None = None

    @field_validator("episodes", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """A bare string is an episode table with only its path."""
        return [{"path": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, value: list[str]) -> list[str]:
        for aspect in value:
            if aspect not in ASPECTS:
                raise ValueError(f"{aspect!r} is not an aspect; aspects are {', '.join(ASPECTS)}")
        return value


@dataclass(frozen=True)
class SeriesEpisode:
    """One episode of a series: its script, its place in the series, and its own settings."""

    script: Path
    index: int  # script order, from 0
    priority: int = 0
    budget_yuan: float | None = None


@dataclass(frozen=True)
class Delivery:
    """What one render delivers: an episode at one profile and aspect (None: the profile's own)."""

    profile: str
    aspect: str | None

    @property
    def label(self) -> str:
        return f"{Path(self.profile).stem}{f' {self.aspect}' if self.aspect else ''}"


@dataclass(frozen=True)
class Series:
    """A validated manifest, its paths resolved."""

    name: str
    manifest: Path
    episodes: list[SeriesEpisode]
    deliveries: list[Delivery]
    episode_budget_yuan: float | None
    night_cap_yuan: float | None
    order: str
    results: Path
    schedule: ScheduleSpec | None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-").lower() or "series"

    def budget_for(self, episode: SeriesEpisode) -> float | None:
        return episode.budget_yuan if episode.budget_yuan is not None else self.episode_budget_yuan

    def night_of(self, now: datetime) -> datetime | None:
        """The start of the night ``now`` falls in (the latest cron time at or before it, in the
        schedule's time zone), or None without a schedule."""
        return None if self.schedule is None else nights_between(self.schedule, None, now)[-1]


def nights_between(spec: ScheduleSpec, after: datetime | None, now: datetime) -> list[datetime]:
    """Night starts in (``after``, ``now``], oldest first; with ``after`` None, the latest one only.
    Times are aware, in the schedule's zone."""
    from croniter import croniter

    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    zone = ZoneInfo(spec.timezone)
    now = now.astimezone(zone)
    it = croniter(spec.cron, now + timedelta(seconds=1))
    latest = it.get_prev(datetime)
    if after is None:
        earlier = it.get_prev(datetime)  # the same wall time an hour before: the night began then
        return [earlier if earlier.replace(tzinfo=None) == latest.replace(tzinfo=None) else latest]
    out = [latest]
    while True:
        prev = it.get_prev(datetime)
        if prev <= after.astimezone(zone) or len(out) >= 400:  # a year of nights at most: older are just "missed"
            break
        out.append(prev)
    # Where the clocks go back, a wall time such as 02:30 happens twice: one night, the first.
    nights: dict[datetime, datetime] = {}
    for n in reversed(out):
        if n > after.astimezone(zone):
            nights.setdefault(n.replace(tzinfo=None), n)
    return list(nights.values())


# --------------------------------------------------------------------------- reading


def load_series(path: str | Path) -> Series:
    """Read and validate a manifest; every problem is a SeriesError naming its line."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeriesError(where, "series manifest not found") from None
    except IsADirectoryError:
        raise SeriesError(where, "is a folder; give the series manifest (.toml)") from None
    except UnicodeDecodeError:
        raise SeriesError(where, "not UTF-8 text; a series manifest is a TOML file") from None
    except OSError as exc:
        raise SeriesError(where, f"cannot read it ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _decode_line(str(exc)) or max(len(text.splitlines()), 1)
        raise SeriesError(where, f"not valid TOML: {getattr(exc, 'msg', str(exc))}", line) from None
    lines = KeyLines(text)
    if bad := _non_finite(data):
        raise SeriesError(where, f"{_dotted(bad[0])}: {bad[1]!r} is not a finite number", lines.line(bad[0]))
    try:
        manifest = Manifest(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting; a manifest sets {', '.join(Manifest.model_fields)}" if len(loc) == 1 else \
                f"unknown setting of {_dotted(loc[:-1])}"
            got = ""
        raise SeriesError(where, f"{_dotted(loc)}: {msg}{got}", lines.line(loc)) from None
    return _resolve(manifest, path, lines)


def _resolve(m: Manifest, path: Path, lines: "KeyLines") -> Series:
    base = path.parent
    where = str(path)
    # 1. Episodes: each path or glob, in the order written; a glob's matches sorted by name.
    episodes: list[SeriesEpisode] = []
    seen: dict[Path, int] = {}
    for i, spec in enumerate(m.episodes):
        loc = ("episodes", i, "path")  # a bare string's line is its item's
        pattern = spec.path if Path(spec.path).is_absolute() else str(base / spec.path)
        if glob.has_magic(spec.path):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix in SCRIPT_SUFFIXES)
            if not found:
                raise SeriesError(where, f"episodes: {spec.path!r} matches no script ({', '.join(SCRIPT_SUFFIXES)}) "
                                  f"in {base}", lines.line(loc))
        else:
            found = [Path(pattern)]
            if not found[0].is_file():
                raise SeriesError(where, f"episodes: {spec.path!r}: no such script (relative to {base})",
                                  lines.line(loc))
            if found[0].suffix not in SCRIPT_SUFFIXES:
                raise SeriesError(where, f"episodes: {spec.path!r}: not a script; an episode is a "
                                  f"{', '.join(SCRIPT_SUFFIXES)} file", lines.line(loc))
        for script in found:
            script = script.resolve()
            if script in seen:
                raise SeriesError(where, f"episodes: {script.name} is listed twice (entries {seen[script] + 1} and "
                                  f"{i + 1})", lines.line(loc))
            seen[script] = i
            episodes.append(SeriesEpisode(script, len(episodes), spec.priority, spec.budget_yuan))
    if len(episodes) > MAX_EPISODES:
        raise SeriesError(where, f"episodes: {len(episodes):,} scripts, more than a series holds ({MAX_EPISODES:,})",
                          lines.line(("episodes",)))
    # 2. Deliveries: every profile (checked now, so a typo is refused before any night) × aspect.
    from pipeline.config import resolve_profile

    profiles = []
    for i, name in enumerate(m.profiles):
        given = name if not Path(name).suffix or Path(name).is_absolute() else str(base / name)
        try:
            resolve_profile(given)
        except ProfileError as exc:
            raise SeriesError(where, f"profiles: {exc}", lines.line(("profiles", i))) from None
        profiles.append(given)
    deliveries = [Delivery(p, a) for p in profiles for a in (m.aspects or [None])]
    if len(set(deliveries)) != len(deliveries):
        raise SeriesError(where, "profiles/aspects: the same delivery is listed twice", lines.line(("profiles",)))
    results = Path(m.results) if m.results and Path(m.results).is_absolute() else \
        ((base / m.results).resolve() if m.results else Path("out") / "series" / path.stem)
    return Series(name=m.name, manifest=path.resolve(), episodes=episodes, deliveries=deliveries,
                  episode_budget_yuan=m.episode_budget_yuan, night_cap_yuan=m.night_cap_yuan, order=m.order,
                  results=results, schedule=m.schedule)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _decode_line(message: str) -> int | None:
    found = re.search(r"line (\d+)", message)
    return int(found.group(1)) if found else None


def _non_finite(data: Any, loc: tuple = ()) -> tuple[tuple, float] | None:
    if isinstance(data, float) and not math.isfinite(data):
        return loc, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if found := _non_finite(value, (*loc, key)):
            return found
    return None


class KeyLines:
    """Where each key of a TOML document is written: 1-based lines by key path, such as
    ``("schedule", "cron")``, ``("episodes", 1)`` (the second item of an array) or
    ``("episodes", 1, "budget_yuan")`` (a key of an inline table in it). tomllib keeps no
    positions, so the text is scanned: table headers, ``key =`` lines, and the items of
    arrays, one per line or several on a line."""

    _KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")
    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        table: tuple = ()
        counts: dict[tuple, int] = {}
        array: tuple | None = None  # the key of a multi-line array being read, and its next item
        item = 0
        depth = 0
        for no, raw in enumerate(text.splitlines(), 1):
            line = _strip_comment(raw)
            if array is not None:
                item, depth = self._items(line, array, item, depth, no)
                if depth <= 0:
                    array = None
                continue
            if (head := self._HEADER.match(line)) and not self._KEY.match(line):
                name = tuple(p.strip().strip('"') for p in head.group(2).split("."))
                if head.group(1) == "[[":
                    n = counts.get(name, 0)
                    counts[name] = n + 1
                    table = (*name, n)
                else:
                    table = name
                self.lines.setdefault(table, no)
                self.lines.setdefault(name, no)
                continue
            if key := self._KEY.match(line):
                path = (*table, *(p.strip('"\'') for p in key.group(1).split(".")))
                self.lines.setdefault(path, no)
                rest = line[key.end():].strip()
                if rest.startswith("["):
                    item, depth = self._items(rest, path, 0, 0, no)
                    if depth > 0:
                        array = path

    def _items(self, text: str, path: tuple, item: int, depth: int, no: int) -> tuple[int, int]:
        """Record the array items that start on this line; returns the next item and the depth."""
        i, in_str = 0, None
        while i < len(text):
            c = text[i]
            if in_str:
                if c == "\\" and in_str == '"':
                    i += 1
                elif c == in_str:
                    in_str = None
            elif c in "\"'":
                if depth == 1:
                    self.lines.setdefault((*path, item), no)
                in_str = c
            elif c == "[":
                depth += 1
            elif c == "{":
                if depth == 1:
                    self.lines.setdefault((*path, item), no)
                    for key in re.finditer(r"([A-Za-z0-9_-]+)\s*=", text[i:]):
                        self.lines.setdefault((*path, item, key.group(1)), no)
                depth += 1
            elif c in "]}":
                depth -= 1
            elif c == "," and depth == 1:
                item += 1
            elif depth == 1 and not c.isspace() and (*path, item) not in self.lines:
                self.lines[(*path, item)] = no  # a number or a bare literal
            i += 1
        return item, depth

    def line(self, loc: tuple) -> int | None:
        """The line of ``loc``, or of its nearest parent that is written (a missing key: its table)."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return 1 if self.lines else None


def _strip_comment(line: str) -> str:
    in_str = None
    for i, c in enumerate(line):
        if in_str:
            if c == in_str:
                in_str = None
        elif c in "\"'":
            in_str = c
        elif c == "#":
            return line[:i]
    return line
