"""MLflow tracking, from the driver only: one run per render, live while it renders.

Experiment = series (the title page's ``Series`` or the episode title); run = one render.

* **Live.** :class:`RenderRun` opens the run when the render starts (status RUNNING, the plan,
  the profile and the estimate logged first), logs each shot's cost and the progress as the
  executor reports them (``on_node``, ``on_progress``), and ends it FINISHED, FAILED or KILLED
  with a ``stopped`` tag (``storyboard``, ``budget``, ``approval``, ``error``, ``interrupted``,
  ``driver_gone``). While the render runs one thread owns the MLflow calls, so a slow tracking
  server never holds up the executor.
* **Cannot break a paid render.** Every MLflow failure is caught and reported once; the render
  goes on. Before a finished render is logged its whole record (:class:`RunRecord`: plan,
  ledger, metrics, tags, the JSON side files) is written to the :class:`Spool`, the artifact
  store's ``tracking-pending/`` folder, and removed only once MLflow has taken it; what stays
  there is logged by the next ``anim runs`` or ``anim render`` (:func:`relog_pending`).
* **Safe first use.** A SQLite store is created (schema and migrations) under a file lock
  beside it (``mlflow.db.lock``), before any other MLflow call of the process (:func:`client`);
  a SQLite file in a folder that does not exist is an error, not a new folder.
* **Abandoned runs.** A run records its driver's host, pid and process start and beats a
  ``heartbeat`` tag; a RUNNING run whose driver is gone (not alive on this host, or silent for
  :data:`STALE_S` elsewhere) is closed as KILLED by whoever finds it (:func:`close_abandoned`).
* An unreachable server fails within seconds: :func:`mlflow_defaults` bounds MLflow's HTTP
  retries and timeout unless the environment sets them.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models import Ledger, LedgerRecord, RenderPlan
from stages.records import AnimError

HEARTBEAT_S = 30.0  # how often a live run says its driver is alive
STALE_S = 600.0  # a driver on another host silent this long is gone
LOCK_WAIT_S = 60.0  # the longest wait for another process to finish creating a SQLite store
LIVE_JOIN_S = 30.0  # the longest wait for the live thread's last batch at the end of a render
RETRY_AFTER_S = 60.0  # a render's end asks a server that failed at its start again only after this long
HTTP_DEFAULTS = {  # fail in seconds, not minutes (MLflow's own: 7 retries, 120 s); the spool is the retry
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
Status = Literal["FINISHED", "FAILED", "KILLED"]
LEDGER_COLUMNS = ("stage", "shot", "seconds", "resource", "units", "yuan", "cached", "method", "partial")
# per shot: the audit, and (adaptive in-betweening) how many keyframe pairs took which route
QUALITY_COLUMNS = ("audit_psnr_db", "audit_ssim", "flicker", "route_flow", "route_rife", "route_fallback")


class TrackingError(AnimError):
    """MLflow could not be used; the message names the tracking URI and what failed."""


def mlflow_defaults() -> None:
    """No telemetry, no progress bars or INFO lines on the console, HTTP retries and timeout bounded so an
    unreachable server fails in seconds. MLflow reads these from the environment, so an entry
    point (the CLI callback, an experiment's ``main``) calls this once before MLflow is first
    used; importing this module changes nothing. Values already set are kept."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables…"
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def code_version() -> str:
    """The git commit of the checkout, or the package version when not in a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    if sha:
        return sha
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("anim-pipeline")
    except PackageNotFoundError:
        return "unknown"


_NET_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)|(Read timed out|Connection refused|timed out)")


def summary(exc: BaseException) -> str:
    """One short line for an MLflow, HTTP or database failure (their messages run to pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "HTTPConnectionPool" in text or "HTTPSConnectionPool" in text:  # requests' page about retries
        reason = _NET_REASON.search(text)
        return f"server unreachable ({(reason.group(1) or reason.group(2)).strip() if reason else 'no answer'})"
    for cut in (" (Background on this error", " [SQL:"):
        text = text.split(cut)[0]
    return text if len(text) <= 240 else text[:237] + "…"


# --------------------------------------------------------------------------- the tracking store


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def check_uri(tracking_uri: str) -> None:
    """What can be checked without a connection: a URI is given, and a SQLite file's folder
    exists (MLflow would silently create it, so a typo would start a second history)."""
    if not tracking_uri or not tracking_uri.strip():
        raise TrackingError("tracking_uri is empty: set MLFLOW_TRACKING_URI, e.g. sqlite:///mlflow.db")
    db = sqlite_path(tracking_uri)
    if db is None or str(db) in ("", ":memory:"):
        return
    if not db.parent.is_dir():
        raise TrackingError(f"tracking_uri {tracking_uri}: folder {db.parent} does not exist; create it or point "
                            "MLFLOW_TRACKING_URI at a file in an existing folder")
    if db.is_dir():
        raise TrackingError(f"tracking_uri {tracking_uri}: {db} is a folder, not a SQLite file")


@contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, waiting at most :data:`LOCK_WAIT_S`."""
    try:
        fh = open(path, "a+b")
    except OSError as exc:
        raise TrackingError(f"{what}: cannot open its lock file {path} ({exc.strerror})") from None
    with fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(f"{what}: another process has held {path} for {LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri``, its store ready to use.

    MLflow creates and migrates a SQLite store the first time a client opens it, and two
    processes doing so at once corrupt it; so the client is built under a lock beside the
    file (``mlflow.db.lock``): the first process creates the schema, the others wait and find
    it complete. Raises :class:`TrackingError` with one line.
    """
    import mlflow

    check_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    try:
        if db is None:
            return mlflow.MlflowClient(tracking_uri)
        with _file_lock(db.with_name(db.name + ".lock"), f"tracking store {tracking_uri}"):
            return mlflow.MlflowClient(tracking_uri)  # builds the store: schema and migrations, once
    except TrackingError:
        raise
    except Exception as exc:  # MLflow, SQLAlchemy, alembic: all of them say the store is unusable
        raise TrackingError(f"tracking store {tracking_uri}: {summary(exc)}") from exc


def experiment(mlflow_client, tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing. With a SQLite store, artifacts go
    beside the database file rather than into whatever directory the command started in."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(tracking_uri)
        where = (db.parent / "mlartifacts").resolve().as_uri() if db else None
        try:
            return mlflow_client.create_experiment(name, artifact_location=where)
        except MlflowException:  # another driver created it a moment ago
            exp = mlflow_client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"tracking store {tracking_uri}: experiment {name!r} is deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or rename the series")
    return exp.experiment_id


# --------------------------------------------------------------------------- drivers and abandoned runs


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (``/proc/PID/stat`` field 22), None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def driver_tags() -> dict[str, str]:
    """Who is logging: host, pid and process start (a reused pid is not the same driver)."""
    pid = os.getpid()
    return {"driver_host": socket.gethostname(), "driver_pid": str(pid), "driver_start": _process_start(pid) or ""}


def driver_alive(tags: dict[str, str], last_seen: float, *, now: float | None = None) -> bool:
    """Whether the driver ``tags`` name is still alive: on this host, its pid runs with the same
    start time; on another host, it was heard from (``last_seen``, epoch s) within :data:`STALE_S`."""
    now = time.time() if now is None else now
    pid = tags.get("driver_pid", "")
    if tags.get("driver_host") == socket.gethostname() and pid.isdigit():
        if Path("/proc/self/stat").is_file():
            start = _process_start(int(pid))
            return start is not None and tags.get("driver_start", "") in ("", start)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - last_seen < STALE_S


def close_abandoned(mlflow_client, experiment_ids: list[str], *, now: float | None = None) -> list[str]:
    """Close as KILLED (``stopped=driver_gone``) every RUNNING render run of these experiments
    whose driver is gone; returns their ids. A run of this tool without driver tags (written by
    an older version, which logged a finished render in seconds) counts as gone once it has been
    RUNNING for :data:`STALE_S`. Runs of other tools are left alone."""
    from mlflow.entities import RunTag

    if not experiment_ids:
        return []
    now = time.time() if now is None else now
    closed = []
    for run in mlflow_client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'",
                                         max_results=1000):
        tags = run.data.tags
        if "driver_pid" not in tags and "script_sha256" not in tags:
            continue  # not a render of ours
        try:
            beat = float(tags.get("heartbeat") or run.info.start_time / 1000)
        except ValueError:
            beat = run.info.start_time / 1000
        if driver_alive(tags, beat, now=now):
            continue
        mlflow_client.log_batch(run.info.run_id, tags=[RunTag("stopped", "driver_gone"), RunTag("status", "killed"),
                                                       RunTag("closed_by", f"{socket.gethostname()}:{os.getpid()}")])
        mlflow_client.set_terminated(run.info.run_id, "KILLED", end_time=int(beat * 1000))
        closed.append(run.info.run_id)
    return closed


# --------------------------------------------------------------------------- the record of a render


class RunRecord(BaseModel):
    """Everything one render logs when it ends; what the spool keeps until MLflow takes it."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a perfect audit's PSNR is +inf

    schema_version: int = 1
    uid: str = Field(description="Tag render_uid of the run: finds it again, so a record is logged once.")
    tracking_uri: str = Field(description="Where the render meant to log it.")
    run_id: str | None = Field(None, description="The live run in tracking_uri, if one was opened.")
    experiment: str
    run_name: str
    start_ms: int
    end_ms: int
    status: Status
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    ledger: Ledger
    quality: dict[str, dict[str, float]] = Field(default_factory=dict)
    plan: RenderPlan
    documents: dict[str, Any] = Field(default_factory=dict, description="JSON side files (cost.json, config.json).")
    artifacts: dict[str, str] = Field(default_factory=dict, description="Artifact name -> published file.")
    store_keys: list[str] = Field(default_factory=list,
                                  description="Artifact-store entries that hold the artifacts too.")


def run_status(stopped: str | None) -> Status:
    """FINISHED for a render that did what was asked (complete, or a storyboard-only render);
    KILLED for one stopped before its end (budget, approval); FAILED for a failure."""
    if stopped in (None, "storyboard"):
        return "FINISHED"
    return "FAILED" if stopped == "error" else "KILLED"


def profile_params(plan: RenderPlan) -> dict[str, str]:
    params = {f"profile.{k}": str(v) for k, v in plan.profile.model_dump().items()}
    return params | {"width": str(plan.width), "height": str(plan.height)}


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _log_all(mlflow_client, run_id: str, *, metrics: dict[str, float] | None = None, step: int = 0,
             when_ms: int | None = None, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
    """Tags, params and metrics in as few calls as MLflow allows (100 tags/params, 1000 metrics each)."""
    from mlflow.entities import Metric, Param, RunTag

    when_ms = int(time.time() * 1000) if when_ms is None else when_ms
    for batch in _batches([RunTag(k, str(v)) for k, v in (tags or {}).items()], 100):
        mlflow_client.log_batch(run_id, tags=batch)
    for batch in _batches([Param(k, str(v)) for k, v in (params or {}).items()], 100):
        mlflow_client.log_batch(run_id, params=batch)
    for batch in _batches([Metric(k, float(v), when_ms, step) for k, v in (metrics or {}).items()], 1000):
        mlflow_client.log_batch(run_id, metrics=batch)


def _from_store(store, keys: list[str], name: str) -> Path | None:
    for key in keys:
        files = store.get(key) if store is not None else None
        if files and name in files:
            return files[name]
    return None


def log_record(mlflow_client, run_id: str, rec: RunRecord, *, store=None, step: int = 0) -> None:
    """Log ``rec`` into run ``run_id`` and end the run with its status, last, so a run that is no
    longer RUNNING holds everything. Logging a record twice into one run leaves the same run.

    Artifacts come from the published files, or, where those are gone, from the artifact
    store's entries (``store``); the JSON side files are rewritten from the record; what is
    found nowhere is named in the tag ``artifacts_missing``.
    """
    from pipeline.report import cost_chart

    # 1. Tags, params, metrics.
    _log_all(mlflow_client, run_id, tags=rec.tags, params=rec.params, metrics=rec.metrics, step=step,
             when_ms=rec.end_ms)
    # 2. The ledger and quality tables.
    mlflow_client.log_table(run_id, data={k: [getattr(r, k) for r in rec.ledger.records] for k in LEDGER_COLUMNS},
                            artifact_file="ledger.json")
    if rec.quality:
        shots = sorted(rec.quality)
        mlflow_client.log_table(run_id, data={"shot": shots, **{m: [rec.quality[s].get(m) for s in shots]
                                                                for m in QUALITY_COLUMNS}},
                                artifact_file="quality.json")
    # 3. The cost chart, the JSON side files, the outputs.
    files: dict[str, Path] = {}
    missing = []
    for name, path in rec.artifacts.items():
        found = Path(path) if Path(path).is_file() else _from_store(store, rec.store_keys, name)
        if found is not None:
            files[name] = found
        elif name not in rec.documents and name != "plan.json":
            missing.append(name)
    with tempfile.TemporaryDirectory() as tmp:
        files["cost_chart.png"] = cost_chart(rec.ledger, Path(tmp) / "cost_chart.png", title=rec.plan.title,
                                             shots=[s.shot.id for s in rec.plan.shots], stopped=rec.tags.get("stopped"))
        docs = {"plan.json": json.loads(rec.plan.model_dump_json()), **rec.documents}
        for name, doc in docs.items():
            if name not in files:
                files[name] = Path(tmp) / name
                files[name].write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
        for name, path in files.items():
            if path.name == name:
                mlflow_client.log_artifact(run_id, str(path))
            else:  # a store file named differently from its artifact
                link = Path(tmp) / "named" / name
                link.parent.mkdir(exist_ok=True)
                link.symlink_to(path.resolve())
                mlflow_client.log_artifact(run_id, str(link))
    if missing:
        mlflow_client.set_tag(run_id, "artifacts_missing", ",".join(sorted(missing)))
    # 4. The end, last.
    mlflow_client.set_terminated(run_id, rec.status, end_time=rec.end_ms)


# --------------------------------------------------------------------------- records MLflow has not taken yet


class Spool:
    """Run records waiting for MLflow: ``<store>/tracking-pending/<uid>.json``, one per render.

    The artifact store is the one place every driver and every engineer of a cluster sees, and
    its scans (``stats``, ``gc``) read only content-key folders, so they never touch this one.
    On a local store a record is written atomically (temp + rename) and claimed with an
    ``flock`` (``.<uid>.lock``): the render holds its own record's lock while it logs, so a
    concurrent ``anim runs`` leaves it alone. On a remote store a record is one object put;
    there is no lock, and a record is logged once because its run is found again by uid.
    """

    FOLDER = "tracking-pending"

    def __init__(self, store_location: str | Path):
        from pipeline.store.base import local_path, open_fs

        base = local_path(store_location)
        self.local = base / self.FOLDER if base is not None else None
        if self.local is None:
            self.fs, root = open_fs(str(store_location))
            self.root = f"{root.rstrip('/')}/{self.FOLDER}"
        self.where = str(self.local) if self.local is not None else f"{str(store_location).rstrip('/')}/{self.FOLDER}"

    def path(self, uid: str) -> str:
        return f"{self.where}/{uid}.json"

    def put(self, rec: RunRecord) -> str:
        data = rec.model_dump_json().encode()
        if self.local is None:
            self.fs.pipe_file(f"{self.root}/{rec.uid}.json", data)
            return self.path(rec.uid)
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f".{rec.uid}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.local / f"{rec.uid}.json")
        return self.path(rec.uid)

    def uids(self) -> list[str]:
        if self.local is None:
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
            except FileNotFoundError:
                return []
        else:
            names = [p.name for p in self.local.glob("*.json")] if self.local.is_dir() else []
        return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))

    def read(self, uid: str) -> RunRecord:
        """The record; FileNotFoundError if another process logged it meanwhile, ValueError if damaged."""
        if self.local is None:
            raw = self.fs.cat_file(f"{self.root}/{uid}.json")
        else:
            raw = (self.local / f"{uid}.json").read_bytes()
        return RunRecord.model_validate_json(raw)

    def remove(self, uid: str) -> None:
        if self.local is None:
            try:
                self.fs.rm_file(f"{self.root}/{uid}.json")
            except FileNotFoundError:
                pass
            return
        (self.local / f"{uid}.json").unlink(missing_ok=True)
        (self.local / f".{uid}.lock").unlink(missing_ok=True)

    @contextmanager
    def claim(self, uid: str, *, wait: bool) -> Iterator[bool]:
        """Hold record ``uid`` (True) or learn that another process does (False, only if not ``wait``)."""
        if self.local is None:
            yield True
            return
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.local / f".{uid}.lock", "a+b") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _run_for(mlflow_client, tracking_uri: str, rec: RunRecord) -> str:
    """The run a record belongs in: its live run, a run already carrying its uid, or a new one."""
    from mlflow.exceptions import MlflowException

    if rec.run_id and rec.tracking_uri == tracking_uri:
        try:
            return mlflow_client.get_run(rec.run_id).info.run_id
        except MlflowException:
            pass  # the store was replaced since: log it anew
    exp_id = experiment(mlflow_client, tracking_uri, rec.experiment)
    found = mlflow_client.search_runs([exp_id], filter_string=f"tags.render_uid = '{rec.uid}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = mlflow_client.create_run(exp_id, start_time=rec.start_ms, run_name=rec.run_name,
                                   tags={"render_uid": rec.uid, "logged_late": "true",
                                         "logged_late_from": rec.tracking_uri})
    return run.info.run_id


@dataclass
class Relogged:
    """What :func:`relog_pending` did: runs now logged, records it left and why."""

    run_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def relog_pending(mlflow_client, tracking_uri: str, spool: Spool, *, store=None) -> Relogged:
    """Log every waiting record whose render is over into ``tracking_uri`` (the tracking store
    of the command that finds it), each into its own run, and remove it from the spool. A record
    whose driver is still alive (it is logging it now) or that another process holds is left;
    the first MLflow failure stops the pass (the store is still unreachable) and is reported."""
    done = Relogged()
    try:
        uids = spool.uids()
    except Exception as exc:  # an unreachable artifact store: nothing to do now
        done.problems.append(f"pending records in {spool.where} cannot be listed: {summary(exc)}")
        return done
    for uid in uids:
        with spool.claim(uid, wait=False) as mine:
            if not mine:
                continue
            try:
                rec = spool.read(uid)
            except FileNotFoundError:
                continue  # logged by another process meanwhile
            except ValueError as exc:
                done.problems.append(f"{spool.path(uid)} is not a run record ({summary(exc)}); left in place")
                continue
            if driver_alive(rec.tags, rec.end_ms / 1000):
                continue
            try:
                run_id = _run_for(mlflow_client, tracking_uri, rec)
                log_record(mlflow_client, run_id, rec, store=store)
            except Exception as exc:  # MLflow still cannot take it: keep it for the next command
                done.problems.append(f"{spool.path(uid)} stays pending: {summary(exc)}")
                break
            spool.remove(uid)
            done.run_ids.append(run_id)
    return done


# --------------------------------------------------------------------------- the live run


class _Writer(threading.Thread):
    """The one owner of MLflow calls while a render runs: the driver's callbacks queue metrics;
    this thread logs them in batches and beats the heartbeat. After its first failure it logs
    nothing more (the render's record still reaches MLflow through the spool)."""

    def __init__(self, mlflow_client, run_id: str | None, opener: Callable[[], tuple[Any, str]] | None = None):
        super().__init__(name="mlflow-live-run", daemon=True)
        self.client, self.run_id, self.opener = mlflow_client, run_id, opener
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None

    def put(self, metrics: list[tuple[str, float, int]]) -> None:
        if self.error is None:
            self.queue.put((metrics, int(time.time() * 1000)))

    def stop(self, timeout: float) -> str | None:
        """Log what is queued, end the thread; the error that stopped it, if any."""
        self.queue.put(None)
        self.join(timeout)
        if self.is_alive():
            self.error = self.error or f"live logging still blocked after {timeout:.0f} s"
        return self.error

    def run(self) -> None:
        from mlflow.entities import Metric, RunTag

        if self.opener is not None:  # open the run here, while the render goes on (``start(background=True)``)
            try:
                self.client, self.run_id = self.opener()
            except Exception as exc:  # noqa: BLE001 - the render's record still reaches MLflow through the spool
                self.error = summary(exc)
        beat = time.time()
        running = True
        while running:
            try:
                items = [self.queue.get(timeout=HEARTBEAT_S)]
            except queue.Empty:
                items = []
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            running = None not in items
            if self.error is not None:
                continue  # drain until told to stop; log nothing more
            metrics = [Metric(key, float(value), when, step)
                       for queued, when in filter(None, items) for key, value, step in queued]
            tags = []
            if time.time() - beat >= HEARTBEAT_S:
                tags, beat = [RunTag("heartbeat", f"{time.time():.0f}")], time.time()
            try:
                for batch in _batches(metrics, 1000):
                    self.client.log_batch(self.run_id, metrics=batch, tags=tags)
                    tags = []
                if tags:
                    self.client.log_batch(self.run_id, tags=tags)
            except Exception as exc:
                self.error = summary(exc)


@dataclass
class Outcome:
    """How a render's tracking ended."""

    run_id: str | None = None  # the run that holds the render (None: not in MLflow yet)
    pending: str | None = None  # the record that waits for MLflow, when the run is not complete
    error: str | None = None  # why MLflow did not take it
    lost: str | None = None  # why the record could not even be kept
    relogged: list[str] = field(default_factory=list)  # earlier renders logged now
    closed: list[str] = field(default_factory=list)  # abandoned runs closed as KILLED


class RenderRun:
    """One render's MLflow run, live from the render's start to its end.

    ``start()`` before the render (raises :class:`TrackingError` only for a URI the user must
    fix, such as a SQLite file in a missing folder; any other failure is kept in ``error`` and
    the render goes on); ``on_node`` / ``on_progress`` as the executor's callbacks; then
    ``finish(...)`` with what the render delivered, or ``abort(...)`` if it did not get there.
    No method but ``start`` raises.
    """

    def __init__(self, tracking_uri: str, plan: RenderPlan, *, series: str | None = None,
                 script: str | Path | None = None, tags: dict[str, str] | None = None,
                 budget_yuan: float | None = None, spool: Spool | None = None, store=None):
        self.uri, self.plan, self.spool, self.store = tracking_uri, plan, spool, store
        self.experiment = series or plan.title
        self.uid = uuid.uuid4().hex
        self.start_ms = int(time.time() * 1000)
        self.budget_yuan = budget_yuan
        self.tags = {"script_sha256": plan.script_sha256, "profile": plan.profile.name,
                     "backend": plan.profile.backend, "aspect": plan.profile.aspect,
                     "script": Path(script or plan.source).name, "code_version": code_version(),
                     "render_uid": self.uid, **driver_tags(), **(tags or {})}
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # the run's experiment, once open (a UI link needs both)
        self.error: str | None = None
        self._failed_at: float | None = None  # when MLflow last failed (monotonic s)
        self.closed: list[str] = []
        self._writer: _Writer | None = None
        self._index = {s.shot.id: i for i, s in enumerate(plan.shots)}
        self._shot_yuan: dict[str, float] = defaultdict(float)
        self._nodes = 0
        self._progress_calls = 0

    @property
    def run_name(self) -> str:
        return f"{self.plan.title} [{self.plan.profile.name}]"

    # ---- 1. the start: the plan and the estimate first
    def start(self, *, log_plan: bool = True, background: bool = False) -> None:
        """Open the run (RUNNING, the plan and the estimate first). ``background``: open it on the
        live-logging thread while the caller goes on rendering (MLflow's start-up, seconds on a
        SQLite file, then overlaps the render instead of delaying it); metrics queued meanwhile are
        logged once it is open, and ``run_id`` is set then. A bad URI raises here either way."""
        check_uri(self.uri)
        if background:
            def opener():
                self._open(log_plan=log_plan)
                return self.client, self.run_id

            self._writer = _Writer(None, None, opener)
            self._writer.start()
            return
        try:
            self._open(log_plan=log_plan)
        except Exception as exc:
            self.error, self._failed_at = summary(exc), time.monotonic()
            return
        self._writer = _Writer(self.client, self.run_id)
        self._writer.start()

    def _open(self, *, log_plan: bool) -> None:
        self.client = self.client or client(self.uri)
        exp_id = self.experiment_id = experiment(self.client, self.uri, self.experiment)
        self.closed += close_abandoned(self.client, [exp_id])
        run = self.client.create_run(exp_id, start_time=self.start_ms, run_name=self.run_name,
                                     tags={**self.tags, "status": "running", "heartbeat": f"{time.time():.0f}"})
        self.run_id = run.info.run_id
        estimate = {"estimated_cost_yuan": self.plan.estimated_cost_yuan, "shots": len(self.plan.shots),
                    "frames": self.plan.total_frames, "keyframes": self.plan.total_keyframes,
                    "duration_s": self.plan.duration_s,
                    **{f"estimated_cost.{k}_yuan": v for k, v in self.plan.estimate_by_stage().items()}}
        if self.budget_yuan is not None:
            estimate["budget_yuan"] = self.budget_yuan
        _log_all(self.client, self.run_id, params=profile_params(self.plan), metrics=estimate)
        if log_plan:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "plan.json"
                path.write_text(self.plan.model_dump_json(indent=2), encoding="utf-8")
                self.client.log_artifact(self.run_id, str(path))

    # ---- 2. while it renders (the executor's callbacks, on the driver)
    def on_node(self, node, rows: list[LedgerRecord]) -> None:
        """A node finished: the money spent so far, and a shot's cost once its clip is done
        (metric ``shot_cost_yuan``, step = the shot's place in the script)."""
        try:
            self._nodes += 1
            shot = getattr(node, "shot", None)
            if shot is not None:
                self._shot_yuan[shot] += sum(r.yuan for r in rows)
            metrics = [("node_yuan", sum(r.yuan for r in rows), self._nodes)]
            if node.stage == "clip" and shot in self._index:
                metrics.append(("shot_cost_yuan", self._shot_yuan[shot], self._index[shot]))
            if self._writer is not None:
                self._writer.put(metrics)
        except Exception as exc:  # never let tracking stop a render
            self.error = self.error or f"live logging: {summary(exc)}"

    def on_progress(self, done: int, total: int, yuan: float) -> None:
        try:
            self._progress_calls += 1
            if self._writer is not None:
                self._writer.put([("shots_done", done, done), ("spent_yuan", yuan, self._progress_calls)])
        except Exception as exc:
            self.error = self.error or f"live logging: {summary(exc)}"

    def _stop_live(self) -> None:
        if self._writer is not None:
            error = self._writer.stop(LIVE_JOIN_S)
            if error and self.error is None:
                self.error, self._failed_at = error, time.monotonic()
            if self._writer.is_alive():
                self.client = None  # still in use by a blocked thread: do not share it
                if self._writer.opener is not None and self._writer.run_id is None:
                    self.run_id = None  # still opening: whatever it opens, the spool's record is the render's
            self._writer = None

    # ---- 3. the end
    def record(self, *, ledger: Ledger, metrics: dict[str, float], stopped: str | None,
               quality: dict[str, dict[str, float]] | None = None, artifacts: dict[str, Path] | None = None,
               documents: dict[str, Any] | None = None, store_keys: list[str] | None = None,
               tags: dict[str, str] | None = None) -> RunRecord:
        """The render's record: what ``finish`` logs, and what the spool keeps until it is logged."""
        documents = documents or {}
        metrics = dict(metrics)
        cost = documents.get("cost.json")
        for name in ("episode_spent_yuan", "budget_yuan"):  # spend across attempts, when the render has it
            value = cost.get(name) if isinstance(cost, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[name] = float(value)
        tags = {**self.tags, "status": stopped or "complete", **(tags or {})}
        if stopped:
            tags["stopped"] = stopped
        return RunRecord(uid=self.uid, tracking_uri=self.uri, run_id=self.run_id, experiment=self.experiment,
                         run_name=self.run_name, start_ms=self.start_ms, end_ms=int(time.time() * 1000),
                         status=run_status(stopped), tags=tags, params=profile_params(self.plan), metrics=metrics,
                         ledger=ledger, quality=quality or {}, plan=self.plan, documents=documents,
                         artifacts={k: str(v) for k, v in (artifacts or {}).items()}, store_keys=store_keys or [])

    def finish(self, rec: RunRecord) -> Outcome:
        """Log the finished render. Its record is in the spool first and leaves it only once
        MLflow has it all; then earlier records left in the spool are logged too."""
        self._stop_live()
        out = Outcome(closed=list(self.closed))
        if self.spool is None:
            self._log_final(rec, out)
            return out
        try:
            with self.spool.claim(rec.uid, wait=True):
                out.pending = self.spool.put(rec)  # 1. safe before MLflow is asked
                if self._log_final(rec, out):
                    self.spool.remove(rec.uid)  # 2. MLflow has it
                    out.pending = None
        except Exception as exc:  # the spool's store failed: MLflow is the only copy, if it answers
            out.lost = f"the record could not be kept in {self.spool.where}: {summary(exc)}"
            if out.run_id is None and out.error is None:
                self._log_final(rec, out)
            if out.pending is not None and out.run_id is not None:
                out.pending = None  # logged; only the removal failed (the uid keeps it from being logged twice)
        if out.run_id and self.client is not None:  # 3. MLflow answers: whatever waits can go in now
            try:
                out.relogged = relog_pending(self.client, self.uri, self.spool, store=self.store).run_ids
            except Exception:  # noqa: BLE001 - they stay in the spool for the next command
                pass
        return out

    def _log_final(self, rec: RunRecord, out: Outcome) -> bool:
        """One attempt to log ``rec``, even if the live run broke off or never opened, when that
        was long enough ago for the server to answer again (a server that does not answer costs
        its timeout once per render, not twice)."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            out.error = self.error
            return False
        try:
            if self.run_id is None:
                self._open(log_plan=False)
                rec.run_id = self.run_id
            self.client = self.client or client(self.uri)
            log_record(self.client, self.run_id, rec, store=self.store, step=max(self._nodes, self._progress_calls))
        except Exception as exc:
            out.error = self.error = summary(exc)
            self._failed_at = time.monotonic()
            return False
        out.run_id, self.error = self.run_id, None
        return True

    def abort(self, stopped: str, message: str = "") -> None:
        """End a render that did not get to its end: FAILED (``stopped="error"``) or KILLED
        (``"interrupted"``), with the error's line. If MLflow cannot be told, the run is left
        RUNNING and whoever finds it later closes it as KILLED."""
        self._stop_live()
        if self.error is not None or self.run_id is None:
            return
        try:
            _log_all(self.client, self.run_id, tags={"status": "failed" if stopped == "error" else "killed",
                                                     "stopped": stopped, **({"error": message[:4000]} if message else {})})
            self.client.set_terminated(self.run_id, run_status(stopped))
        except Exception as exc:
            self.error = summary(exc)


# --------------------------------------------------------------------------- metrics and one-shot logging


def render_metrics(plan: RenderPlan, ledger: Ledger, *, wall_seconds: float, billed_yuan: float,
                   quality: dict[str, dict[str, float]], consistency: dict[str, float] | None = None) -> dict[str, float]:
    """The run's metrics: cost (attributed and billed), resources, sizes, cache and quality."""
    minutes = plan.duration_s / 60.0
    executed = [r for r in ledger.records if not r.cached]
    metrics: dict[str, float] = {
        "cost_yuan": ledger.total_yuan,
        "cost_yuan_per_min": ledger.total_yuan / minutes if minutes else 0.0,
        "billed_yuan": billed_yuan,
        "utilization": ledger.total_yuan / billed_yuan if billed_yuan else 0.0,
        "estimated_cost_yuan": plan.estimated_cost_yuan,
        "wall_seconds": wall_seconds,
        "cpu_seconds": sum(r.seconds * r.units for r in executed if r.resource == "cpu"),
        "gpu_seconds": sum(r.seconds * r.units for r in executed if r.resource.startswith("gpu")),
        "frames": plan.total_frames,
        "keyframes": plan.total_keyframes,
        "shots": len(plan.shots),
        "duration_s": plan.duration_s,
        "cache_hit_ratio": sum(r.cached for r in ledger.records) / max(len(ledger.records), 1),
    }
    for stage, yuan in ledger.by_stage().items():
        metrics[f"cost.{stage}_yuan"] = yuan
    for name in ("audit_psnr_db", "audit_ssim", "flicker"):
        values = [q[name] for q in quality.values() if name in q]
        if values:
            metrics[name] = sum(values) / len(values)
            if name != "flicker":
                metrics[f"{name}_min"] = min(values)
    if consistency:
        metrics["character_consistency"] = sum(consistency.values()) / len(consistency)
        for name, score in consistency.items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
            metrics[f"consistency.{safe}"] = score
    return metrics


def log_render(*, tracking_uri: str, plan: RenderPlan, ledger: Ledger, metrics: dict[str, float],
               artifacts: dict[str, Path], tags: dict[str, str], series: str | None = None,
               quality: dict[str, dict[str, float]] | None = None, plan_json: bool = False) -> str:
    """Log one render that has already ended as one MLflow run, in one go (experiments and
    calibration renders, which nobody watches live); returns the run id. ``plan_json``
    was the flag that added the plan; the plan is now always logged, and the argument is
    accepted for older callers. Raises :class:`TrackingError`."""
    tags = dict(tags)
    stopped = tags.pop("stopped", None) or (None if tags.get("status", "complete") == "complete" else tags["status"])
    run = RenderRun(tracking_uri, plan, series=series, tags=tags)
    run.start(log_plan=False)  # log_record logs the plan with everything else
    if run.error is not None:
        raise TrackingError(f"tracking store {tracking_uri}: {run.error}")
    out = run.finish(run.record(ledger=ledger, metrics=metrics, stopped=stopped, quality=quality,
                                artifacts=artifacts))
    if out.run_id is None:
        raise TrackingError(f"tracking store {tracking_uri}: {out.error}")
    return out.run_id
