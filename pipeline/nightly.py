"""The nightly batch of a series: plan every episode against the store, render what changed,
report in the morning.

A night, as numbered steps (``run_night``):

1. **Plan** every episode × delivery of the manifest against the artifact store (``pipeline.plan``
   and ``pipeline.schedule``: pure, no Ray) — what a render would recompute now and its estimate.
2. **Pick** the episodes with anything to recompute, whose last night failed, or whose published
   folder is not their current render; **order** them: last night's failures first, then by
   priority (``order = "priority"``) and script order.
3. **Admit** them within the night's cap, an episode whole (every delivery) or not at all: the
   first that does not fit stops admission, and it and the ones after it wait for the next night.
4. **Render** each admitted delivery in this process (one Ray cluster for the night, each render
   tracked and published like ``anim render``), or submit it to the render service
   (``pipeline.service.client``) and wait for it.
5. **Report**: one MLflow run for the night (``pipeline.nightly_report``), the table printed.

Which nights ran is kept in a small SQL table of its own (``NightBook``; setting ``nights``,
``ANIM_NIGHTS``: a SQLite file by default, a database URL for the service): a night is claimed
by inserting its row before anything is rendered, and the row is unique per series and night,
so a night never runs twice, whoever asks. Its runner beats a heartbeat while it runs; a night
left running by a runner that died (a killed service or cron job) is taken over by the next
runner while it is still the latest night and resumed — what was rendered is in the store and
costs nothing, and jobs it had queued at the service come back by their Idempotency-Key — or
recorded failed ("interrupted") once a later night has begun. ``run_due`` is what the render service calls from
its loop: which nights are due at ``now``, with missed nights handled by the manifest's policy.

Exit codes a scheduler can act on (``exit_code``): 0 every picked episode delivered (or nothing
to do), 3 some stopped (the night's cap, an episode's budget, the approval gate), 1 some failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pipeline.series import Delivery, Series, SeriesEpisode, nights_between
from stages.records import AnimError

Status = Literal["rendered", "unchanged", "failed", "stopped", "waiting"]
EXIT_DONE, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
BEAT_S = 30.0  # a running night's runner says it is alive this often
STALE_S = 180.0  # a running night whose runner has been silent this long is taken over (resumed)


class NightlyError(AnimError):
    """The nightly batch cannot run (its night records, a store the cluster cannot see, …)."""


# --------------------------------------------------------------------------- 1-3. plan, pick, order, admit


@dataclass
class Tonight:
    """One delivery of one episode as tonight sees it."""

    episode: SeriesEpisode
    delivery: Delivery
    plan: Any  # RenderPlan
    schedule: Any  # Schedule
    out_dir: Path
    gate: Any  # GateState
    why: str | None  # why it is picked: "changed", "failed last night", "not published"; None = unchanged
    script: Any = None  # the parsed Episode, for the plan timed by the voices once they are spoken

    @property
    def estimate_yuan(self) -> float:
        return self.schedule.estimate_yuan

    @property
    def key(self) -> str:
        return row_key(self.episode.script.name, self.delivery.label)


@dataclass
class NightPlan:
    series: Series
    night: str  # the night's start, ISO in UTC (or the UTC date without a schedule)
    items: list[Tonight]
    admitted: list[Tonight] = field(default_factory=list)
    waiting: list[Tonight] = field(default_factory=list)  # picked, not admitted: past the night's cap
    broken: list[tuple[SeriesEpisode, str]] = field(default_factory=list)  # scripts that cannot be planned: why

    @property
    def picked(self) -> list[Tonight]:
        return self.admitted + self.waiting

    @property
    def estimate_yuan(self) -> float:
        return sum(t.estimate_yuan for t in self.admitted)


def open_settings_store(settings):
    """The configured artifact store: the default one is created on first use; one the user named
    must lie in an existing folder (as every command treats it)."""
    from pipeline.store import open_store

    return open_store(settings.store, create_parents=settings.sources.get("store", "default") == "default")


def row_key(script_name: str, label: str) -> str:
    return f"{script_name} [{label}]"


def night_key(series: Series, now: datetime) -> str:
    """The night ``now`` belongs to: its scheduled start in UTC, or the UTC date without a schedule."""
    start = series.night_of(now)
    if start is None:
        return now.astimezone(timezone.utc).strftime("%Y-%m-%d")
    return start.astimezone(timezone.utc).isoformat(timespec="minutes")


def plan_night(series: Series, settings, *, now: datetime, previous: dict[str, dict] | None = None) -> NightPlan:
    """Steps 1-3: every episode planned against the store, picked, ordered and admitted. Pure
    planning: reads scripts, the store and the approvals, starts nothing."""
    from pipeline.approvals import open_approvals
    from pipeline.calibrate import cluster_calibration
    from pipeline.calibration import Calibration
    from pipeline.config import check_backend_files, resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.fingerprint import fingerprint

    previous = previous or {}
    # 1. What every plan shares, read once: prices, calibration, the store, the approvals.
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    store = open_settings_store(settings)
    calibration = cluster_calibration(Calibration.load(*settings.calibration_paths), settings.store,
                                      fingerprint(settings.ray_address, settings.num_cpus))
    books: list = []  # the approvals database, opened when a profile's gate first needs it

    def approvals():
        if not books:
            books.append(open_approvals(settings.approvals))
        return books[0]

    profiles = {}
    for d in series.deliveries:
        prof = resolve_profile(d.profile, {"aspect": d.aspect})
        check_backend_files(prof, d.profile)
        profiles[d] = prof
    items: list[Tonight] = []
    broken: list[tuple[SeriesEpisode, str]] = []
    for ep in series.episodes:
        try:  # one episode's bad script fails that episode, with its line; the others still run
            items += _episode_tonight(ep, series, profiles, previous, calibration=calibration, prices=prices,
                                      store=store, approvals=approvals)
        except (AnimError, OSError) as exc:
            broken.append((ep, _line(exc)))
    # 2-3. Pick, order, admit whole episodes.
    return admit(NightPlan(series, night_key(series, now), items, broken=broken), previous)


def _episode_tonight(ep: SeriesEpisode, series: Series, profiles: dict, previous: dict[str, dict], *, calibration,
                     prices, store, approvals: Callable[[], Any]) -> list[Tonight]:
    """Every delivery of one episode planned against the store (the cut timed by the voices
    spoken so far), with its schedule and why it is picked."""
    from pipeline.approvals import gate_on, gate_state
    from pipeline.plan import make_plan
    from pipeline.publish import default_out_dir
    from pipeline.render import music_bed, stored_speech
    from pipeline.schedule import schedule
    from stages.script import load_episode

    episode = load_episode(ep.script)
    sha = hashlib.sha256(ep.script.read_bytes()).hexdigest()
    out = []
    for d in series.deliveries:
        prof = profiles[d]
        rplan = make_plan(episode, prof, calibration=calibration, prices=prices, script_sha256=sha,
                          bed=music_bed(episode, prof))
        if speech := stored_speech(rplan, store):
            rplan = make_plan(episode, prof, calibration=calibration, prices=prices, script_sha256=sha,
                              speech=speech, bed=rplan.bed)
        gate = gate_state(approvals(), rplan, True) if gate_on(prof) else _NoGate()
        sched = schedule(rplan, store, approvals=gate.approvals)
        item = Tonight(ep, d, rplan, sched, default_out_dir(ep.script, d.profile, prof.aspect, root=series.results),
                       gate, None, episode)
        item.why = _why(item, previous.get(item.key))
        out.append(item)
    return out


class _NoGate:
    """The approval gate of a profile that has it off: nothing held back, no database read."""

    gate = False
    approvals = None

    def tags(self) -> dict[str, str]:
        return {"approval_gate": "off"}

    def summary(self) -> dict:
        return {"gate": False, "counts": {}, "shots": []}


def _why(item: Tonight, last: dict | None) -> str | None:
    if last is not None and last.get("status") == "failed":
        return "failed last night"
    if item.schedule.where("run"):
        return "changed"
    if item.schedule.stopped is None and _published_key(item.out_dir) != item.plan.assemble_key:
        return "not published"  # every node stored, but the folder holds another render (or none)
    return None


def _published_key(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "plan.json").read_text(encoding="utf-8")).get("assemble_key")
    except (OSError, ValueError, AttributeError):
        return None


def admit(night: NightPlan, previous: dict[str, dict]) -> NightPlan:
    """Order the picked episodes (last night's failures first, then priority if the manifest
    orders by it, then script order) and admit them whole within the night's cap; the first
    episode that does not fit stops admission."""
    by_episode: dict[int, list[Tonight]] = {}
    for item in night.items:
        by_episode.setdefault(item.episode.index, []).append(item)
    picked = [group for group in by_episode.values() if any(t.why for t in group)]

    def rank(group: list[Tonight]) -> tuple:
        ep = group[0].episode
        failed = any(t.why == "failed last night" for t in group)
        return (not failed, -ep.priority if night.series.order == "priority" else 0, ep.index)

    cap, total, stopped = night.series.night_cap_yuan, 0.0, False
    for group in sorted(picked, key=rank):
        wanted = [t for t in group if t.why]
        cost = sum(t.estimate_yuan for t in wanted)
        if stopped or (cap is not None and total + cost > cap + 1e-12):
            stopped = True
            night.waiting += wanted
            continue
        total += cost
        night.admitted += wanted
    return night


# --------------------------------------------------------------------------- 4. render


@dataclass
class Row:
    """One delivery's line of the morning report."""

    episode: str  # the script's file name
    title: str
    delivery: str
    index: int
    status: Status
    why: str | None = None
    shots_changed: int = 0
    shots: int = 0
    estimate_yuan: float = 0.0
    spent_yuan: float = 0.0
    saved_yuan: float = 0.0  # what the nodes found in the store cost when they were computed
    audit_psnr_db: float | None = None
    flicker: float | None = None
    prev_audit_psnr_db: float | None = None
    prev_flicker: float | None = None
    stopped: str | None = None
    error: str | None = None
    out_dir: str = ""
    run_id: str | None = None
    job_id: int | None = None

    @property
    def key(self) -> str:
        return row_key(self.episode, self.delivery)


def _row(item: Tonight, status: Status, previous: dict[str, dict], **more) -> Row:
    """The report's row of ``item``; ``more`` sets what the render measured (and may correct the
    shots changed: a render times the cut by the voices it has just spoken)."""
    last = previous.get(item.key) or {}
    values = dict(shots_changed=len(item.schedule.shots_to_render), shots=len(item.plan.shots))
    return Row(**{"episode": item.episode.script.name, "title": item.plan.title, "delivery": item.delivery.label,
                  "index": item.episode.index, "status": status, "why": item.why, **values,
                  "estimate_yuan": item.estimate_yuan, "out_dir": str(item.out_dir),
                  "prev_audit_psnr_db": last.get("audit_psnr_db"), "prev_flicker": last.get("flicker"), **more})


def _stored_quality(item: Tonight, store) -> dict[str, float]:
    """Mean audit PSNR and flicker of the episode's stored clips (what an unchanged episode has)."""
    values: dict[str, list[float]] = {"audit_psnr_db": [], "flicker": []}
    for s in item.plan.shots:
        files = store.get(s.keys["clip"]) or {}
        if "quality.json" in files:
            q = json.loads(Path(files["quality.json"]).read_text())
            for name in values:
                if isinstance(q.get(name), (int, float)):
                    values[name].append(float(q[name]))
    return {k: sum(v) / len(v) for k, v in values.items() if v}


def _saved_yuan(item: Tonight, store, plan=None, sched=None, spoken_now: frozenset[str] = frozenset()) -> float:
    """What the nodes tonight found in the store cost when they were computed (their spend notes),
    or their estimate where no note is on record (computed before notes were kept). The voices a
    render has just spoken (``spoken_now``, content keys) are its spend, not savings."""
    from pipeline.ledger import episode_ledger

    spent = episode_ledger(plan or item.plan, store).by_node()
    return sum(spent.get(n.id, n.estimate_yuan) for n in (sched or item.schedule).where("hit")
               if n.key not in spoken_now)


def _quality(metrics_or_quality: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name in ("audit_psnr_db", "flicker"):
        values = [q[name] for q in metrics_or_quality.values() if name in q]
        if values:
            out[name] = sum(values) / len(values)
    return out


class InProcess:
    """Renders each delivery in this process, on one Ray cluster for the whole night, tracked and
    published exactly like ``anim render`` (its MLflow run in the series' experiment)."""

    def __init__(self, settings, on_line: Callable[[str], None] = lambda line: None):
        import imageio_ffmpeg

        from pipeline.cost import PriceCatalog
        from pipeline.dag import Cluster

        self.settings, self.on_line = settings, on_line
        self.prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                                        provider=settings.price_provider)
        self.store = open_settings_store(settings)
        # joining a cluster refuses a store its other nodes cannot see (``dag.Cluster.start``)
        self.cluster = Cluster(settings.ray_address, settings.num_cpus, store=settings.store)
        self.ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()

    def render(self, item: Tonight, budget_yuan: float | None, night: str, series: Series,
               previous: dict[str, dict]) -> Row:
        from pipeline import tracking
        from pipeline.approvals import gate_state, open_approvals, preview_clips
        from pipeline.cli import _learn, _money, _voiced
        from pipeline.ledger import episode_ledger
        from pipeline.publish import check_out_dir, publish
        from pipeline.render import render, speak

        settings, store = self.settings, self.store
        self.cluster.start()
        saved = 0.0  # until the render says which nodes it found in the store
        try:
            check_out_dir(item.out_dir)
            # As `anim render` does it: the voices first (cheap, billed), then the cut timed by them.
            new_voices = frozenset(v.key for v in item.plan.voices if store.get(v.key) is None)
            spent = episode_ledger(item.plan, store).total_yuan if budget_yuan is not None else 0.0
            spoken = speak(item.plan, store=store, prices=self.prices, ffmpeg=self.ffmpeg, cluster=self.cluster,
                           budget_yuan=budget_yuan, spent_yuan=spent)  # under the episode's cap, as the rest
            rplan = _voiced(settings, item.script, self.prices, item.plan, store)
            if item.gate.gate:
                item.gate = gate_state(open_approvals(settings.approvals), rplan, True)
            live = tracking.RenderRun(settings.tracking_uri, rplan, series=series.name, script=item.episode.script,
                                      tags={"cluster": settings.ray_address or "local", "nightly": night,
                                            **item.gate.tags()},
                                      budget_yuan=budget_yuan, spool=tracking.Spool(store.url), store=store)
            live.start()
        except AnimError as exc:
            return _row(item, "failed", previous, error=_line(exc), saved_yuan=saved)
        try:
            result = render(rplan, store=store, prices=self.prices, ffmpeg=self.ffmpeg, cluster=self.cluster,
                            spoken=spoken, approvals=item.gate.approvals, budget_yuan=budget_yuan,
                            budget_scope="render", on_progress=live.on_progress, on_node=live.on_node)
        except AnimError as exc:
            live.abort("error", str(exc))
            return _row(item, "failed", previous, error=_line(exc), saved_yuan=saved)
        except BaseException as exc:
            live.abort("interrupted" if isinstance(exc, KeyboardInterrupt) else "error", repr(exc))
            raise
        metrics, cost = _money(rplan, result, self.prices, budget_yuan)
        outputs = result.outputs if result.stopped is None else {**result.outputs, **preview_clips(rplan, store)}
        documents = {"cost.json": cost, "config.json": {"settings": settings.model_dump(),
                                                        "profile": rplan.profile.model_dump()},
                     "approvals.json": item.gate.summary()}
        try:
            written = publish(outputs, item.out_dir, {"plan.json": json.loads(rplan.model_dump_json()), **documents})
        except AnimError as exc:
            live.abort("error", str(exc))
            return _row(item, "failed", previous, error=_line(exc), spent_yuan=result.spent_yuan, saved_yuan=saved)
        tracked = live.finish(live.record(ledger=result.ledger, metrics=metrics, stopped=result.stopped,
                                          quality=result.quality, artifacts=written, documents=documents,
                                          store_keys=[rplan.assemble_key, rplan.contact_sheet_key]))
        _learn(settings, rplan, result, tracked.run_id)
        status: Status = "rendered" if result.stopped is None else "stopped"
        saved = _saved_yuan(item, store, rplan, result.schedule, new_voices)
        return _row(item, status, previous, spent_yuan=result.spent_yuan, saved_yuan=saved,
                    shots_changed=len(result.schedule.shots_to_render),
                    stopped=result.stopped, run_id=tracked.run_id, **_quality(result.quality),
                    error=None if result.stopped is None else
                    (result.budget_note or f"stopped ({result.stopped}); {len(result.remaining)} shots remain"))


class ViaService:
    """Submits each delivery to the render service (``pipeline.service.client``) and waits for it;
    the service renders it on the cluster and publishes its files, downloaded here into the
    series' results folder. The service must use the same artifact store as this command (the
    night is planned against it), and knows the manifest's profiles by name: a profile given as a
    .toml path must be one the service can read too. The night's cap is kept by admission on
    estimates; each job carries its episode's budget."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 6 * 3600):
        from pipeline.service.client import ServiceClient

        self.client, self.timeout_s = ServiceClient(url, token), timeout_s
        self.jobs: dict[str, int] = {}
        self.store = None

    def submit_all(self, items: list[Tonight], budgets: dict[str, float | None], series: Series,
                   night: str = "") -> dict[str, str]:
        """Submit every admitted delivery up front (the service queues them); returns the refusals.
        Each submission's Idempotency-Key names the series, night and delivery: a resumed night gets
        the jobs its first runner queued back instead of queueing them again."""
        refused = {}
        for item in items:
            key = "night-" + hashlib.sha256(f"{series.name}\n{night}\n{item.key}".encode()).hexdigest()[:32]
            try:
                job = self.client.submit(item.episode.script, profile=item.delivery.profile,
                                         aspect=item.delivery.aspect, budget_yuan=budgets[item.key], series=series.name,
                                         key=key if night else None)
                self.jobs[item.key] = int(job["id"])
            except AnimError as exc:
                refused[item.key] = _line(exc)
        return refused

    def render(self, item: Tonight, budget_yuan: float | None, night: str, series: Series,
               previous: dict[str, dict]) -> Row:
        job_id = self.jobs[item.key]
        try:
            job = self.client.wait(job_id, timeout_s=self.timeout_s)
        except AnimError as exc:
            return _row(item, "failed", previous, error=_line(exc), job_id=job_id)
        spent = float((job.get("progress") or {}).get("spent_yuan") or 0.0)
        quality: dict[str, float] = {}
        if "cost.json" in (job.get("files") or []):
            item.out_dir.mkdir(parents=True, exist_ok=True)
            for name in job["files"]:
                self.client.download(job_id, name, item.out_dir / name)
            cost = json.loads((item.out_dir / "cost.json").read_text(encoding="utf-8"))
            spent = float(cost.get("total_yuan", spent))
            quality = _quality(cost.get("quality") or {})
        status = {"succeeded": "rendered", "stopped": "stopped"}.get(job["status"], "failed")
        error = job.get("error") or job.get("stopped_reason") or (None if status == "rendered" else job["status"])
        return _row(item, status, previous, spent_yuan=spent, stopped=job.get("stopped_reason"),
                    error=None if status == "rendered" else _line(error), job_id=job_id,
                    **quality)


def _line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- a whole night


@dataclass
class NightResult:
    series: str
    night: str
    rows: list[Row]
    exit_code: int
    run_id: str | None = None
    report: Path | None = None
    ran: bool = True  # False: the night had already run (or was claimed) elsewhere
    note: str = ""


def exit_code(rows: Iterable[Row]) -> int:
    statuses = {r.status for r in rows}
    if "failed" in statuses:
        return EXIT_FAILED
    if statuses & {"stopped", "waiting"}:
        return EXIT_STOPPED
    return EXIT_DONE


def run_night(series: Series, settings, *, now: datetime, book: "NightBook", server: str | None = None,
              token: str | None = None, on_line: Callable[[str], None] = lambda line: None) -> NightResult:
    """One night of ``series`` at ``now``: plan, claim it, admit, render, report. A night already
    claimed (run, running or missed) is not run again: the result says so with ``ran=False``. A
    night whose planning fails (a bad script) leaves no record: fixed, it can still run."""
    from pipeline import nightly_report

    night = night_key(series, now)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    last = book.get(series.name, night)
    resumed = last is not None and book.stale(series.name, night, now)
    if last is None or resumed:
        previous = book.previous_rows(series.name, night)
        tonight = plan_night(series, settings, now=now, previous=previous)
    taken = book.take_over(series.name, night, owner, now) if resumed else (
        last is None and book.claim(series.name, night, now, owner=owner))  # the claim: one row per night
    if not taken:
        last = book.get(series.name, night)
        return NightResult(series.name, night, [], EXIT_DONE, ran=False,
                           note=f"night {night} of {series.name} is already {last['state'] if last else 'claimed'}"
                                f"{'' if not last or not last['finished_at'] else ' (' + last['finished_at'] + ')'}"
                                "; nothing run")
    if resumed:
        on_line(f"resuming night {night} of {series.name}: its runner stopped; what it rendered is in the store")
    beating = _Heartbeat(book, series.name, night, owner, now)
    try:
        rows = _render(tonight, settings, previous, server=server, token=token, on_line=on_line, night=night)
        code = exit_code(rows)
        run_id, report, untracked = nightly_report.publish_night(series, night, rows, settings.tracking_uri, now=now)
    except BaseException as exc:
        beating.stop()
        book.finish(series.name, night, "failed", [], EXIT_FAILED, datetime.now(timezone.utc), note=_line(exc))
        raise
    beating.stop()
    book.finish(series.name, night, {0: "done", 1: "failed", 3: "stopped"}[code], rows, code,
                datetime.now(timezone.utc))
    return NightResult(series.name, night, rows, code, run_id, report,
                       note=f"MLflow did not take the night's run: {untracked}" if untracked else "")


class _Heartbeat(threading.Thread):
    """Beats a running night's claim every ``BEAT_S`` on the night's clock (``now`` plus the time
    since), so a runner that dies leaves a beat that grows stale."""

    def __init__(self, book: "NightBook", series: str, night: str, owner: str, now: datetime):
        super().__init__(name=f"night-beat-{night}", daemon=True)
        self.book, self.series, self.night, self.owner = book, series, night, owner
        self.now, self.t0, self.stopped = now, time.monotonic(), threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(BEAT_S):
            try:
                self.book.beat(self.series, self.night, self.owner,
                               self.now + timedelta(seconds=time.monotonic() - self.t0))
            except AnimError:
                pass  # the records are unreachable for now: the next beat tries again

    def stop(self) -> None:
        self.stopped.set()


def _render(tonight: NightPlan, settings, previous: dict[str, dict], *, server: str | None, token: str | None,
            on_line: Callable[[str], None], night: str = "") -> list[Row]:
    """Step 4: render (or submit and wait for) every admitted delivery; rows for every delivery."""
    series = tonight.series
    rows: dict[str, Row] = {}
    renderer: InProcess | ViaService | None = None
    budgets: dict[str, float | None] = {}
    if tonight.admitted:
        renderer = ViaService(server, token) if server else InProcess(settings, on_line)
    # Each render's cap: the episode's budget, and what is left of the night's cap when it starts.
    # The admission used estimates; a cap per render keeps actual spend within the night's.
    for item in tonight.admitted:
        budgets[item.key] = series.budget_for(item.episode)
    refused = renderer.submit_all(tonight.admitted, budgets, series, night) if isinstance(renderer, ViaService) else {}
    spent = 0.0
    for item in tonight.admitted:
        if item.key in refused:
            rows[item.key] = _row(item, "failed", previous, error=refused[item.key])
            continue
        budget = budgets[item.key]
        if series.night_cap_yuan is not None and not isinstance(renderer, ViaService):
            left = max(series.night_cap_yuan - spent, 0.0)
            budget = left if budget is None else min(budget, left)
        on_line(f"rendering {item.key} ({item.why}; {len(item.schedule.shots_to_render)} shots, "
                f"estimated ¥{item.estimate_yuan:.5f})")
        row = renderer.render(item, budget, tonight.night, series, previous)
        spent += row.spent_yuan
        rows[item.key] = row
    if isinstance(renderer, ViaService):
        renderer.client.close()
    store = renderer.store if isinstance(renderer, InProcess) else None
    if store is None:
        store = open_settings_store(settings)
    for item in tonight.waiting:
        rows[item.key] = _row(item, "waiting", previous, error=f"not admitted: the night's cap "
                              f"¥{series.night_cap_yuan:.5f} is taken by episodes before it; next night",
                              saved_yuan=_saved_yuan(item, store))
    for item in tonight.items:
        if item.key not in rows:
            rows[item.key] = _row(item, "unchanged", previous, saved_yuan=_saved_yuan(item, store),
                                  **_stored_quality(item, store))
    for ep, why in tonight.broken:  # a script that cannot be planned: each delivery failed, with its line
        for d in series.deliveries:
            rows[row_key(ep.script.name, d.label)] = Row(episode=ep.script.name, title="", delivery=d.label,
                                                         index=ep.index, status="failed", why="script", error=why)
    order = [d.label for d in series.deliveries]
    return sorted(rows.values(), key=lambda r: (r.index, order.index(r.delivery)))


# --------------------------------------------------------------------------- the night records


class NightBook:
    """Which nights of which series ran, in one SQL table (SQLite by default, any SQLAlchemy URL).
    A row is inserted when a night is claimed, before anything renders; (series, night) is
    unique, so a second claim of one night fails however many processes ask."""

    def __init__(self, location: str | Path):
        import sqlalchemy as sa

        text = str(location).strip()
        if not text:
            raise NightlyError("the night records need a location: a path or a database URL")
        self._path = None
        if "://" not in text:
            self._path = Path(text).expanduser().absolute()
            text = f"sqlite:///{self._path}"
        self._sa = sa
        meta = sa.MetaData()
        self._nights = sa.Table(
            "nightly_nights", meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("series", sa.String(200), nullable=False),
            sa.Column("night", sa.String(40), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),  # running, done, stopped, failed, missed
            sa.Column("claimed_at", sa.String(40), nullable=False),
            sa.Column("finished_at", sa.String(40), nullable=True),
            sa.Column("exit_code", sa.Integer, nullable=True),
            sa.Column("rows", sa.Text, nullable=False, default="[]"),
            sa.Column("note", sa.Text, nullable=False, default=""),
            sa.UniqueConstraint("series", "night", name="one_row_per_night"))
        # who runs a running night, and when it last said so: a night whose runner died is taken over
        self._claims = sa.Table(
            "nightly_claims", meta,
            sa.Column("series", sa.String(200), primary_key=True),
            sa.Column("night", sa.String(40), primary_key=True),
            sa.Column("owner", sa.String(200), nullable=False),
            sa.Column("beat_at", sa.String(40), nullable=False))
        self._series = sa.Table(
            "nightly_series", meta,
            sa.Column("series", sa.String(200), primary_key=True),
            sa.Column("registered_at", sa.String(40), nullable=False))
        try:
            self.location = sa.engine.make_url(text).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            raise NightlyError(f"night records {text.split('://')[0]}://…: not a database URL "
                               "(e.g. sqlite:///path/nights.db, postgresql://host/db) or a file path") from None
        try:
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = sa.create_engine(text, connect_args={"timeout": 30} if text.startswith("sqlite") else {})
            meta.create_all(self._engine)
        except OSError as exc:
            raise NightlyError(f"night records {self.location}: cannot create its folder: {exc.strerror or exc}") \
                from None
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            raise NightlyError(f"night records {self.location}: cannot open it: {_reason(exc)}") from None

    def _run(self, fn):
        try:
            with self._engine.begin() as conn:
                return fn(conn)
        except self._sa.exc.IntegrityError:
            raise
        except self._sa.exc.SQLAlchemyError as exc:
            raise NightlyError(f"night records {self.location}: {_reason(exc)}") from None

    def claim(self, series: str, night: str, now: datetime, state: str = "running", note: str = "",
              owner: str = "") -> bool:
        """Insert the night's row (and, running, who runs it); False when it already has one (it ran,
        runs, or was missed)."""
        row = {"series": series, "night": night, "state": state, "claimed_at": _iso(now), "rows": "[]", "note": note,
               **({"finished_at": _iso(now)} if state != "running" else {})}

        def insert(conn):
            conn.execute(self._nights.insert(), [row])
            if state == "running":
                conn.execute(self._claims.insert(), [{"series": series, "night": night, "owner": owner or "?",
                                                      "beat_at": _iso(now)}])
        try:
            self._run(insert)
        except self._sa.exc.IntegrityError:
            return False
        return True

    def beat(self, series: str, night: str, owner: str, now: datetime) -> None:
        """The runner of a running night says it is alive."""
        c = self._claims
        self._run(lambda conn: conn.execute(c.update().where(c.c.series == series, c.c.night == night,
                                                             c.c.owner == owner).values(beat_at=_iso(now))))

    def stale(self, series: str, night: str, now: datetime, after_s: float = STALE_S) -> bool:
        """Whether ``night`` is recorded running and its runner has not beaten for ``after_s``."""
        c = self._claims
        rec = self.get(series, night)
        if rec is None or rec["state"] != "running":
            return False
        claim = self._run(lambda conn: conn.execute(c.select().where(c.c.series == series, c.c.night == night))
                          .mappings().first())
        beat = datetime.fromisoformat(claim["beat_at"] if claim else rec["claimed_at"])
        return (now - beat).total_seconds() > after_s

    def take_over(self, series: str, night: str, owner: str, now: datetime, after_s: float = STALE_S) -> bool:
        """Become the runner of a running night whose runner stopped beating; True for exactly one
        of several processes that try at once (the update is conditional on the beat it saw)."""
        c = self._claims
        if not self.stale(series, night, now, after_s):
            return False
        claim = self._run(lambda conn: conn.execute(c.select().where(c.c.series == series, c.c.night == night))
                          .mappings().first())
        if claim is None:  # recorded before runners were: claim it now
            try:
                self._run(lambda conn: conn.execute(c.insert(), [{"series": series, "night": night, "owner": owner,
                                                                  "beat_at": _iso(now)}]))
                return True
            except self._sa.exc.IntegrityError:
                return False
        done = self._run(lambda conn: conn.execute(
            c.update().where(c.c.series == series, c.c.night == night, c.c.owner == claim["owner"],
                             c.c.beat_at == claim["beat_at"]).values(owner=owner, beat_at=_iso(now))))
        return done.rowcount == 1

    def finish(self, series: str, night: str, state: str, rows: list[Row], code: int, now: datetime,
               note: str = "") -> None:
        t = self._nights
        values = {"state": state, "finished_at": _iso(now), "exit_code": code, "note": note,
                  "rows": json.dumps([asdict(r) for r in rows], ensure_ascii=False)}
        self._run(lambda conn: conn.execute(t.update().where(t.c.series == series, t.c.night == night)
                                            .values(**values)))

    def get(self, series: str, night: str) -> dict | None:
        t = self._nights
        found = self._run(lambda conn: conn.execute(t.select().where(t.c.series == series, t.c.night == night))
                          .mappings().first())
        return dict(found) if found else None

    def nights(self, series: str) -> list[dict]:
        """Every recorded night of ``series``, oldest first."""
        t = self._nights
        return [dict(r) for r in self._run(lambda conn: conn.execute(
            t.select().where(t.c.series == series).order_by(t.c.night)).mappings().all())]

    def previous_rows(self, series: str, night: str) -> dict[str, dict]:
        """The rows of the latest night before ``night`` that rendered anything or found it unchanged."""
        for rec in reversed(self.nights(series)):
            if rec["night"] < night and rec["state"] in ("done", "stopped", "failed") and rec["rows"] != "[]":
                return {row_key(r["episode"], r["delivery"]): r for r in json.loads(rec["rows"])}
        return {}

    def registered(self, series: str, now: datetime) -> datetime:
        """When the service first saw ``series`` (recorded now if never): no night before it is due."""
        t = self._series
        found = self._run(lambda conn: conn.execute(t.select().where(t.c.series == series)).mappings().first())
        if found:
            return datetime.fromisoformat(found["registered_at"])
        try:
            self._run(lambda conn: conn.execute(t.insert(), [{"series": series, "registered_at": _iso(now)}]))
        except self._sa.exc.IntegrityError:
            return self.registered(series, now)
        return now.astimezone(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds")


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def open_nights(settings) -> NightBook:
    """The night records the settings name (``nights``, ``ANIM_NIGHTS``)."""
    return NightBook(settings.nights or Path.home() / ".local/share/anim-pipeline/nights.db")


# --------------------------------------------------------------------------- the service's loop


def due_nights(series: Series, book: NightBook, now: datetime) -> list[str]:
    """The nights of ``series`` to run at ``now`` (at most one), recording as missed the ones the
    manifest's policy will never run: nights started after the series was registered and not yet
    recorded; with ``missed = "latest"`` the latest of them runs and earlier ones are missed, with
    ``"skip"`` it runs only within ``grace_minutes`` of its start."""
    spec = series.schedule
    if spec is None:
        return []
    since = book.registered(series.name, now)
    nights = [r for r in book.nights(series.name) if "T" in r["night"]]
    recorded = [datetime.fromisoformat(r["night"]) for r in nights]
    after = max([since, *recorded])
    starts = nights_between(spec, after, now)
    # A night left running by a runner that died (a killed service or cron job): resumed while it is
    # still the latest night (everything it rendered is in the store), else recorded as interrupted.
    for rec in nights:
        if rec["state"] == "running" and book.stale(series.name, rec["night"], now):
            if not starts and rec["night"] == nights[-1]["night"]:
                return [rec["night"]]
            book.finish(series.name, rec["night"], "failed", [], EXIT_FAILED, now,
                        note="interrupted: its runner stopped and a later night began")
    if not starts:
        return []
    *missed, latest = starts
    keys = [s.astimezone(timezone.utc).isoformat(timespec="minutes") for s in starts]
    late = (now - latest).total_seconds() / 60 > spec.grace_minutes
    if spec.missed == "skip" and late:
        missed.append(latest)
    for start in missed:
        book.claim(series.name, start.astimezone(timezone.utc).isoformat(timespec="minutes"), now, state="missed",
                   note=f"missed (policy {spec.missed}): the service was not running at its start")
    return [] if spec.missed == "skip" and late else [keys[-1]]


def run_due(manifests: Iterable[str | Path], settings, *, now: datetime | None = None,
            book: NightBook | None = None, server: str | None = None, token: str | None = None,
            on_line: Callable[[str], None] = lambda line: None) -> list[NightResult]:
    """What the render service's loop calls: for each manifest, the night due at ``now`` (if
    any) run once. A manifest that cannot be read is reported as a failed result and the
    others still run."""
    from pipeline.series import load_series

    now = now or datetime.now(timezone.utc)
    book = book or open_nights(settings)
    results = []
    for path in manifests:
        try:
            series = load_series(path)
            due = due_nights(series, book, now)
        except AnimError as exc:
            results.append(NightResult(str(path), "", [], EXIT_FAILED, ran=False, note=_line(exc)))
            continue
        for night in due:
            try:  # ``now`` lies in the due night: run_night names the same night from it
                results.append(run_night(series, settings, now=now, book=book, server=server, token=token,
                                         on_line=on_line))
            except AnimError as exc:
                results.append(NightResult(series.name, night, [], EXIT_FAILED, ran=False, note=_line(exc)))
    return results
