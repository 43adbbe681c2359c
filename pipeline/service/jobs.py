"""The job queue: uploads checked and planned, renders submitted to Ray Jobs, states reconciled.

The job table (``pipeline.service.db``) is the truth. Every state change is committed before the
service acts on it; a submission is idempotent (``submission_id = anim-<job>-<attempt>``, which
Ray refuses twice), so whatever dies between two steps, the next ``tick`` — the first one after a
start is the reconciliation — finds the table and Ray's job list and carries on:

* a job whose current attempt Ray never took is submitted again under the same id;
* one Ray runs stays as it is; one Ray finished is recorded (succeeded, failed with the render's
  one-line error, stopped for budget or approval);
* one whose driver died (killed, node lost: FAILED without an exit code of its own) or that Ray
  does not know (a new cluster) is submitted as a new attempt, which resumes from the artifact
  store: finished nodes are hits, and the store's leases and spend notes bill no node twice.

A job runs as ``anim render`` (an argument list, never a shell string from user input) of the
uploaded script, stored as ``<data>/jobs/<id>/script<ext>`` whatever the client called it.
With the approval gate, the first attempt stops after the storyboard; once every shot is decided
and none rejected, the job is queued again to render.

A render whose every node is already in the store (a no-op re-render) needs no cluster: the warm
service runs the same ``anim render`` in its own process (``runner = "service"``), with Ray out
of reach — if anything did need Ray after all, that attempt fails at once and the job goes to Ray
as the next attempt, as it does when the service dies mid-way (the table says ``rendering``, not
submitted).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.service.cluster import JobsEndpoint
from pipeline.service.db import ACTIVE, TERMINAL, Job, JobEvent, ServiceError, User, utcnow
from stages.records import AnimError

MAX_UPLOAD_BYTES = 1_000_000  # a 2-hour feature screenplay is about 250 KB
MAX_RESTARTS = 3  # attempts made because a driver died, per phase, before the job fails
EXIT_BUDGET = 3  # ``anim render``: stopped for budget or approval (pipeline/cli.py)


STARTING_S = 60.0  # a render admitted this long ago counts as started even if its progress file says nothing
HEAD_CHECK_S = 5.0  # how often the dispatcher asks whether the local head still works
HEAD_DEAD_S = 60.0  # a local head that has not worked this long is replaced (a loaded one answers slowly)


@dataclass(frozen=True)
class QueuePolicy:
    """How many renders run at once: ``base`` always, and up to ``ceiling`` while the cluster has
    a CPU slot idle, nothing waits for one and its processors have room (``Load.idle``). A render's
    graph leaves slots idle while it starts (imports, connecting, its voices) and in its serial
    tail (assembly, mix, burn-in); another render's nodes can fill them — but a driver and Ray's
    own processes use processors no slot accounts for, so on a small machine whose processors are
    busy anyway no extra render is admitted. Extra renders come one at a time: the next only once
    the last has begun its frame graph (the first line of its progress file), so the idle slots of
    a start-up do not admit a crowd of drivers."""

    base: int
    ceiling: int

    @classmethod
    def fixed(cls, renders: int) -> "QueuePolicy":
        return cls(renders, renders)


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _plain_name(name: str) -> bool:
    return bool(_PLAIN.fullmatch(name))


@dataclass
class Upload:
    """A script as the client sent it: its name (display only) and bytes."""

    filename: str
    data: bytes

    @property
    def display_name(self) -> str:
        name = Path(self.filename.replace("\\", "/")).name
        return "".join(ch for ch in name if ch.isprintable())[:200] or "script"

    @property
    def ext(self) -> str:
        return Path(self.display_name).suffix.lower()


@dataclass
class Planned:
    """A checked upload and its plan's figures (``POST /api/plan``)."""

    upload: Upload
    profile: str
    aspect: str | None
    plan: Any  # pipeline.models.RenderPlan
    gate: bool

    def summary(self, budget_yuan: float | None = None) -> dict:
        p = self.plan
        warnings = []
        if budget_yuan is not None and p.estimated_cost_yuan > budget_yuan:
            warnings.append(f"the estimate ¥{p.estimated_cost_yuan:.4f} is above the budget ¥{budget_yuan:.4f}: "
                            "the render stops when the budget is reached")
        return {"estimate_yuan": p.estimated_cost_yuan, "shots": len(p.shots), "frames": p.total_frames,
                "keyframes": p.total_keyframes, "per_stage": p.estimate_by_stage(),
                "minutes": p.duration_s / 60, "title": p.title, "profile": p.profile.name,
                "aspect": p.profile.aspect, "approval_gate": self.gate, "warnings": warnings}


class JobService:
    """The queue and its reconciliation against Ray; one per service process."""

    def __init__(self, settings, sessions: sessionmaker, endpoint: JobsEndpoint, policy: QueuePolicy,
                 new_head: Callable[[], JobsEndpoint] | None = None):
        self.settings, self.sessions, self.endpoint = settings, sessions, endpoint
        self.policy = policy
        self.new_head = new_head  # starts a local head in place of one that died (None: the studio's cluster)
        self._head_seen = self._head_checked = time.monotonic()
        self._admitted: dict[int, float] = {}  # job -> when its current attempt was admitted (monotonic)
        self.data = Path(settings.service_data).expanduser().absolute()
        self.lock = threading.RLock()  # job state changes: the API's threads and the dispatcher
        self._ray = None
        self._plans: dict[tuple[int, str], Any] = {}
        self._here: set[int] = set()  # jobs whose current attempt runs in this process

    @property
    def ray(self):
        if self._ray is None:
            self._ray = self.endpoint.client()
        return self._ray

    def job_dir(self, job_id: int) -> Path:
        return self.data / "jobs" / str(job_id)

    def script_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / f"script{job.script_ext}"

    def out_dir(self, job: Job) -> Path:
        return self.job_dir(job.id) / "out"

    def progress_path(self, job: Job, attempt: int | None = None) -> Path:
        return self.job_dir(job.id) / f"progress-{job.attempt if attempt is None else attempt}.jsonl"

    # ------------------------------------------------------------------ 1. uploads and plans

    def check(self, upload: Upload, profile: str, aspect: str | None, gate: bool | None = None) -> Planned:
        """Parse the upload with the CLI's reader and plan it (pure, no Ray); a bad script, an
        unknown profile or aspect is a ServiceError (422) with the CLI's one-line error."""
        from pipeline.config import builtin_profiles

        if len(upload.data) > MAX_UPLOAD_BYTES:
            raise ServiceError(f"{upload.display_name}: {len(upload.data)} bytes, more than the upload limit of "
                               f"{MAX_UPLOAD_BYTES} bytes", 413)
        if profile not in builtin_profiles():
            raise ServiceError(f"unknown profile {profile!r}; the service renders built-in profiles: "
                               f"{', '.join(builtin_profiles())}", 422)
        with tempfile.TemporaryDirectory(prefix="anim-upload-") as tmp:
            path = Path(tmp) / (upload.display_name if upload.display_name not in (".", "..") else "script")
            path.write_bytes(upload.data)
            try:
                plan = self._plan(path, profile, aspect)
            except AnimError as exc:
                raise ServiceError(str(exc).replace(f"{tmp}/", ""), 422) from None
        from pipeline.approvals import gate_on

        return Planned(upload, profile, aspect, plan, gate_on(plan.profile, gate))

    def _plan(self, path: Path, profile: str, aspect: str | None):
        from pipeline.cli import _prepare  # the CLI's own parse, profile and plan, errors and all

        return _prepare(self.settings, path, profile, aspect)[3]

    def repeated(self, db: Session, user: User, client_key: str | None) -> list[Job]:
        """The jobs an earlier submission of ``user`` with this Idempotency-Key queued (none if no such)."""
        if not client_key:
            return []
        # autoescape: a key's own "%" or "_" is a character, not a LIKE wildcard that would match another key
        return list(db.scalars(select(Job).where(Job.producer_id == user.id,
                                                 Job.client_key.startswith(f"{client_key}#", autoescape=True))
                               .order_by(Job.id)))

    def create(self, user: User, planned: list[Planned], *, budget_yuan: float | None, series: str = "",
               batch_budget_yuan: float | None = None, client_key: str | None = None) -> tuple[list[Job], bool]:
        """Queue one job per checked upload — all of them or none: a batch whose estimates together
        pass ``batch_budget_yuan`` is refused whole. With ``client_key`` (the request's
        Idempotency-Key) a repeat of a submission returns the jobs it queued and queues nothing; the
        flag says whether these jobs are new."""
        if budget_yuan is not None and budget_yuan < 0:
            raise ServiceError("budget_yuan cannot be negative", 422)
        total = sum(p.plan.estimated_cost_yuan for p in planned)
        if batch_budget_yuan is not None and total > batch_budget_yuan:
            raise ServiceError(f"the batch's {len(planned)} episodes are estimated at ¥{total:.4f} together, above "
                               f"its budget ¥{batch_budget_yuan:.4f}; nothing was queued", 422)
        batch = uuid.uuid4().hex[:12] if len(planned) > 1 else None
        with self.lock, self.sessions() as db:
            if before := self.repeated(db, user, client_key):
                return before, False
            jobs = []
            for n, p in enumerate(planned):
                series_name = series or p.plan.title
                job = Job(producer_id=user.id, series=series_name[:200], script_name=p.upload.display_name,
                          title=p.plan.title[:255],
                          script_ext=p.upload.ext, profile=p.profile, aspect=p.aspect, budget_yuan=budget_yuan,
                          estimate_yuan=p.plan.estimated_cost_yuan, shots_total=len(p.plan.shots),
                          approval_gate=p.gate, batch=batch, status="queued",
                          phase="storyboard" if p.gate else "render",
                          client_key=f"{client_key}#{n}" if client_key else None)
                db.add(job)
                db.flush()
                self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
                self.script_path(job).write_bytes(p.upload.data)
                db.add(JobEvent(job_id=job.id, status="queued", attempt=0, note=f"submitted by {user.username}"))
                jobs.append(job)
            db.commit()
        return jobs, True

    # ------------------------------------------------------------------ 2. the dispatcher

    def tick(self) -> None:
        """One pass: reconcile every job that may have a Ray job, then start queued ones while the
        queue policy allows. Run at start-up (the reconciliation) and every half second."""
        self.watch_head()
        with self.lock, self.sessions() as db:
            for job in db.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.id)):
                self._follow(db, job)
            active = list(db.scalars(select(Job).where(Job.status.in_(ACTIVE))))
            running, starting = len(active), any(self._starting(job) for job in active)
            for job in db.scalars(select(Job).where(Job.status == "queued").order_by(Job.id)):
                if running >= self.policy.ceiling:
                    break
                note = "admitted by the queue"
                if running >= self.policy.base:  # an extra render: only into an idle slot, one at a time
                    load = None if starting else self.endpoint.load()
                    if load is None or not load.idle:
                        break
                    busy = "" if load.cpu_busy is None else f", processors {load.cpu_busy:.0%} busy"
                    note += f" (a CPU slot idle: {load.cpus_used:g} of {load.cpus:g} in use{busy})"
                    starting = True
                self._start_attempt(db, job, "planning" if job.phase == "storyboard" else "rendering", note)
                running += 1

    def _starting(self, job: Job) -> bool:
        """Admitted lately and not yet at its frame graph (no line in its progress file)."""
        since = self._admitted.get(job.id)
        if since is None or time.monotonic() - since > STARTING_S:
            return False
        return "started" not in self._progress(job)

    def watch_head(self, now: float | None = None) -> bool:
        """Replace a local head that no longer works — its Jobs API or GCS gone, or no node left to
        run on (a raylet killed) — for ``HEAD_DEAD_S``: what is left of its processes is stopped and
        a new head started. The Ray jobs it held are unknown to the new one, so the next tick submits
        each as a new attempt, which resumes from the store. True when it replaced the head."""
        from pipeline.service.cluster import stop_local_head

        now = time.monotonic() if now is None else now
        if self.new_head is None or now - self._head_checked < HEAD_CHECK_S:
            return False
        self._head_checked = now
        load = self.endpoint.load(timeout_s=10.0)
        if load is not None and load.cpus > 0:
            self._head_seen = now
            return False
        if now - self._head_seen < HEAD_DEAD_S:
            return False
        import logging

        logging.getLogger("anim.service").warning(
            "the local Ray head at %s has not worked for %.0f s: replacing it", self.endpoint.dashboard_url,
            now - self._head_seen)
        stop_local_head(self.endpoint, grace_s=10)
        self.endpoint, self._ray = self.new_head(), None
        self._head_seen = self._head_checked = time.monotonic()
        return True

    def reconcile_cancelled(self) -> None:
        """At start-up: a job cancelled while its Ray job still ran (the service died between the
        two) has that Ray job stopped now."""
        with self.lock, self.sessions() as db:
            for job in db.scalars(select(Job).where(Job.status == "cancelled", Job.submitted.is_(True))):
                self._stop_ray(job)

    def _set(self, db: Session, job: Job, status: str, note: str, **fields) -> None:
        """Write a state change (and its event) and commit, before anything acts on it."""
        job.status = status
        for key, value in fields.items():
            setattr(job, key, value)
        job.updated_at = utcnow()
        db.add(JobEvent(job_id=job.id, status=status, attempt=job.attempt, note=note))
        db.commit()

    def _start_attempt(self, db: Session, job: Job, status: str, note: str, *, warm: bool = True) -> None:
        attempt = job.attempt + 1
        self._admitted[job.id] = time.monotonic()
        here = warm and self._all_in_store(job)
        self._set(db, job, status, note + ("; every node in the store: rendered by the service" if here else ""),
                  attempt=attempt, submission_id=f"anim-{job.id}-{attempt}", submitted=False,
                  runner="service" if here else "ray")
        if here:
            self._here.add(job.id)
            threading.Thread(target=self._render_here, args=(job.id, job.submission_id), daemon=True,
                             name=f"anim-warm-{job.id}").start()
        else:
            self._submit(db, job)

    def _all_in_store(self, job: Job) -> bool:
        """Whether the render of ``job`` would run no node (every one a hit, none held back)."""
        from pipeline.cli import _prepare, _voiced
        from pipeline.schedule import schedule
        from pipeline.store import open_store

        if job.phase != "render":
            return False
        try:
            store = open_store(self.settings.store)
            # timed as the render will time it: by the voices in the store (the cut follows the voice)
            settings, episode, prices, plan = _prepare(self.settings, self.script_path(job), job.profile, job.aspect)
            plan = _voiced(settings, episode, prices, plan, store)
            approvals = self.gate(job).approvals if job.approval_gate else None
            sched = schedule(plan, store, approvals=approvals)
            # under a budget the contact sheet is always published: one not stored yet is a node to run
            sheet_missing = job.budget_yuan is not None and store.get(plan.contact_sheet_key) is None
        except Exception:  # noqa: BLE001 - anything unclear goes to Ray, which reports it properly
            return False
        return not sched.where("run") and not sched.held_shots() and not sheet_missing

    def log_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / f"attempt-{job.attempt}.log"

    def _render_here(self, job_id: int, submission_id: str) -> None:
        """The warm path: ``anim render`` in this process, its output to the attempt's log; then
        the outcome recorded as a Ray job's would be (a failure sends the job to Ray)."""
        try:
            with self.sessions() as db:
                job = db.get(Job, job_id)
                args, log = self.entrypoint(job)[3:], self.log_path(job)
            code = _invoke_cli(args, log, self.runtime_env()["env_vars"])
        finally:
            with self.lock:
                self._here.discard(job_id)
        with self.lock, self.sessions() as db:
            job = db.get(Job, job_id)
            if job.status not in ACTIVE or job.submission_id != submission_id:
                return  # cancelled meanwhile
            if code == 0:
                self._set(db, job, "succeeded", "rendered by the service (every node in the store)",
                          mlflow_run_id=self._progress(job).get("run_id"))
            elif code == EXIT_BUDGET:
                reason = self._stop_reason(job)
                self._set(db, job, "stopped", f"stopped: {reason}", stopped_reason=reason, error=self._error_line(job))
            else:
                self._start_attempt(db, job, job.status, f"the service's own render exited {code}: to Ray",
                                    warm=False)

    def _submit(self, db: Session, job: Job) -> None:
        """Submit the current attempt; Ray refusing the id as a duplicate means it has it already.
        A cluster that does not answer leaves ``submitted`` false: the next tick tries again."""
        job.runner = "ray"
        try:
            self.ray.submit_job(entrypoint=shlex.join(self.entrypoint(job)), submission_id=job.submission_id,
                                runtime_env=self.runtime_env(), metadata=self.metadata(db, job))
        except Exception as exc:  # noqa: BLE001 - the Jobs API answers errors as RuntimeError text
            if "already exists" not in str(exc):
                job.error = f"the Ray cluster did not take {job.submission_id} yet: {_first_line(exc)}"
                db.commit()
                return
        job.submitted, job.error = True, None
        db.commit()

    def entrypoint(self, job: Job) -> list[str]:
        """``anim render`` of the stored script, as an argument list."""
        python = sys.executable if self.endpoint.local else "python"
        args = [python, "-m", "pipeline", "render", str(self.script_path(job)), "--out", str(self.out_dir(job)),
                "--profile", job.profile, "--no-progress", "--progress-file", str(self.progress_path(job))]
        if job.aspect:
            args += ["--aspect", job.aspect]
        if job.budget_yuan is not None:
            args += ["--budget", f"{job.budget_yuan!r}"]
        args += ["--approval-gate" if job.approval_gate else "--no-approval-gate"]
        if job.phase == "storyboard":
            args += ["--stop-after", "storyboard"]
        return args

    def runtime_env(self) -> dict:
        """The service's resolved settings travel to the render as the environment the CLI reads."""
        import pipeline
        import stages

        s = self.settings
        env = {"MLFLOW_TRACKING_URI": s.tracking_uri, "ANIM_STORE": s.store, "ANIM_APPROVALS": s.approvals,
               "ANIM_PRICES": s.prices, "ANIM_CALIBRATION": s.calibration, "ANIM_USD_CNY": repr(s.usd_cny),
               "ANIM_PRICE_TIER": s.price_tier, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
        if s.price_provider:
            env["ANIM_PRICE_PROVIDER"] = s.price_provider
        if s.config_files:
            env["ANIM_CONFIG"] = s.config_files[-1]
        code = [str(Path(pipeline.__file__).parent), str(Path(stages.__file__).parent)]
        if self.endpoint.local:
            return {"env_vars": {**env, "PYTHONPATH": str(Path(pipeline.__file__).parent.parent)}}
        return {"env_vars": env, "py_modules": code}

    def metadata(self, db: Session, job: Job) -> dict[str, str]:
        producer = db.get(User, job.producer_id)
        return {"job": str(job.id), "attempt": str(job.attempt), "producer": producer.username if producer else "",
                "series": job.series, "budget_yuan": "" if job.budget_yuan is None else repr(job.budget_yuan),
                "phase": job.phase}

    def _follow(self, db: Session, job: Job) -> None:
        """Reconcile one job that may have a Ray job with what Ray says about it."""
        if job.id in self._here:
            return  # running in this process; a service that died with it left it to be submitted
        if not job.submitted:
            self._submit(db, job)
            return
        try:
            info = self.ray.get_job_info(job.submission_id)
        except Exception as exc:  # noqa: BLE001
            if "does not exist" in str(exc):
                self._restart(db, job, f"Ray does not know {job.submission_id} (a new cluster)")
            return  # the cluster does not answer: the table stays as it is
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            run_id = self._progress(job).get("run_id")
            if run_id and run_id != job.mlflow_run_id:
                job.mlflow_run_id = run_id
                db.commit()
            return
        self._finished(db, job, status, info)

    def _finished(self, db: Session, job: Job, status: str, info) -> None:
        code = info.driver_exit_code
        run_id = self._progress(job).get("run_id") or job.mlflow_run_id
        if status == "SUCCEEDED":
            if job.phase == "storyboard":
                self._set(db, job, "awaiting_approval", "storyboard ready", mlflow_run_id=run_id, restarts=0)
                self._continue_if_decided(db, job)
            else:
                self._set(db, job, "succeeded", "rendered", mlflow_run_id=run_id)
        elif status == "FAILED" and code == EXIT_BUDGET:
            reason = self._stop_reason(job)
            self._set(db, job, "stopped", f"stopped: {reason}", stopped_reason=reason, mlflow_run_id=run_id,
                      error=self._error_line(job))
        elif status == "FAILED" and code is not None and 0 < code < 128:
            self._set(db, job, "failed", f"anim render exited {code}", mlflow_run_id=run_id,
                      error=self._error_line(job) or f"anim render exited with {code}: {info.message}")
        elif status == "STOPPED":
            self._set(db, job, "stopped", "stopped on the cluster", stopped_reason="cluster",
                      error=f"the Ray job {job.submission_id} was stopped outside the service")
        else:  # FAILED with no exit code of its own (killed by a signal, supervisor or node lost)
            why = (info.message or status).strip().splitlines()[0]
            self._restart(db, job, f"the driver of {job.submission_id} died ({why}; exit {code})")

    def _restart(self, db: Session, job: Job, why: str) -> None:
        if job.restarts >= MAX_RESTARTS:
            self._set(db, job, "failed", why, error=f"{why}; gave up after {MAX_RESTARTS} restarts")
            return
        job.restarts += 1
        self._start_attempt(db, job, job.status, f"{why}: resubmitted, resuming from the store")

    def _stop_reason(self, job: Job) -> str:
        try:
            status = json.loads((self.out_dir(job) / "cost.json").read_text()).get("status")
        except (OSError, ValueError):
            status = None
        return status if status in ("budget", "approval") else "budget"

    def _error_line(self, job: Job) -> str | None:
        lines = [line.strip() for line in self.logs(job, tail=400).splitlines()]
        errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
        return errors[-1] if errors else None

    # ------------------------------------------------------------------ 3. what producers do

    def cancel(self, db: Session, job: Job, by: str) -> None:
        if job.status in TERMINAL:
            raise ServiceError(f"job {job.id} is {job.status} already", 409)
        self._set(db, job, "cancelled", f"cancelled by {by}")
        self._stop_ray(job)

    def _stop_ray(self, job: Job) -> None:
        if job.submitted and job.submission_id:
            try:
                self.ray.stop_job(job.submission_id)
            except Exception:  # noqa: BLE001 - gone already, or the cluster is down: reconciled at start-up
                pass

    def retry(self, db: Session, job: Job, by: str) -> None:
        if job.status not in ("failed", "stopped", "cancelled"):
            raise ServiceError(f"job {job.id} is {job.status}: only a failed, stopped or cancelled job is retried",
                               409)
        self._set(db, job, "queued", f"retried by {by}", phase="storyboard" if job.approval_gate else "render",
                  error=None, stopped_reason=None, restarts=0, submitted=False)

    def plan_of(self, job: Job):
        key = (job.id, job.script_ext)
        if key not in self._plans:
            self._plans[key] = self._plan(self.script_path(job), job.profile, job.aspect)
        return self._plans[key]

    def gate(self, job: Job):
        from pipeline.approvals import gate_state, open_approvals

        return gate_state(open_approvals(self.settings.approvals), self.plan_of(job), True)

    def decide(self, db: Session, job: Job, shots: list[str] | None, decision: str, by: str, comment: str) -> None:
        """Record a decision on some shots (None: all) in the approvals database; when every shot
        is decided the job goes on: queued to render when none is rejected, else stopped."""
        from pipeline.approvals import decide, open_approvals

        if job.status != "awaiting_approval":
            raise ServiceError(f"job {job.id} is {job.status}, not awaiting approval", 409)
        if decision not in ("approve", "reject"):
            raise ServiceError(f"decision {decision!r}: 'approve' or 'reject'", 422)
        plan = self.plan_of(job)
        ids = {s.shot.id: s for s in plan.shots}
        unknown = [s for s in shots or [] if s not in ids]
        if unknown:
            raise ServiceError(f"no shot {', '.join(unknown)}; shots are {', '.join(ids)}", 422)
        chosen = list(ids.values()) if shots is None else [ids[s] for s in shots]
        try:
            open_approvals(self.settings.approvals).record(
                decide(plan, chosen, "approved" if decision == "approve" else "rejected", by=by, comment=comment))
        except AnimError as exc:
            raise ServiceError(str(exc), 422) from None
        self._continue_if_decided(db, job)

    def _continue_if_decided(self, db: Session, job: Job) -> None:
        counts = self.gate(job).counts()
        if counts["pending"]:
            return
        if counts["rejected"]:
            self._set(db, job, "stopped", f"{counts['rejected']} panel(s) rejected", stopped_reason="approval")
        else:
            self._set(db, job, "queued", "every panel approved", phase="render", restarts=0, submitted=False)

    # ------------------------------------------------------------------ 4. what producers see

    def _progress(self, job: Job, attempt: int | None = None) -> dict:
        """The last values of the current attempt's progress file (or of ``attempt``'s)."""
        state: dict = {}
        try:
            lines = self.progress_path(job, attempt).read_text(encoding="utf-8").splitlines()
        except OSError:
            return state
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if rec.get("event") == "start":
                state["started"] = rec["t"]
            if rec.get("stage") and rec.get("event") != "progress":
                state["stage"] = rec["stage"]
            state.update({k: rec[k] for k in ("shots_done", "spent_yuan", "run_id", "experiment_id", "shots_total")
                          if rec.get(k) is not None})  # the run id arrives once MLflow has opened the run
            state["t"] = rec["t"]
        return state

    def progress(self, job: Job) -> dict:
        p = self._progress(job) if job.attempt else {}
        total = p.get("shots_total", job.shots_total)
        done = p.get("shots_done", 0)
        if job.status == "succeeded":
            done = total
        eta = None
        if job.status in ACTIVE and done and "started" in p:
            eta = max(0.0, (time.time() - p["started"]) / done * (total - done))
        stage = {"queued": "queued", "awaiting_approval": "approval"}.get(job.status, p.get("stage"))
        if job.status in TERMINAL:
            stage = job.status
        # ¥ so far is the job's: earlier attempts' spend (the storyboard's, a dead driver's) and this one's
        # (an attempt resumes from the store, so what an earlier one paid for is never paid again)
        before = sum(self._progress(job, a).get("spent_yuan", 0.0) for a in range(1, job.attempt))
        return {"stage": stage, "shots_done": done, "shots_total": total,
                "spent_yuan": before + p.get("spent_yuan", 0.0), "eta_s": eta, "updated_at": p.get("t")}

    def files(self, job: Job) -> list[str]:
        """What the render published: plain files in the job's out folder."""
        out = self.out_dir(job)
        if not out.is_dir():
            return []
        return sorted(p.name for p in out.iterdir() if p.is_file() and not p.is_symlink() and _plain_name(p.name))

    def file(self, job: Job, name: str) -> Path:
        if name not in self.files(job):
            raise ServiceError(f"job {job.id} has no file {name!r}", 404)
        return self.out_dir(job) / name

    def logs(self, job: Job, tail: int = 200) -> str:
        if job.runner == "service":
            try:
                text = self.log_path(job).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            return "\n".join(text.splitlines()[-max(1, tail):]) + "\n"
        if not job.submitted or not job.submission_id:
            return ""
        try:
            text = self.ray.get_job_logs(job.submission_id)
        except Exception as exc:  # noqa: BLE001
            return f"(no logs from the cluster: {_first_line(exc)})\n"
        return "\n".join(text.splitlines()[-max(1, tail):]) + "\n"

    def panels(self, job: Job) -> list[dict]:
        if job.attempt == 0 or not job.approval_gate:
            return []
        state = self.gate(job)
        return [{"shot": s.shot, "url": f"/api/jobs/{job.id}/panels/{s.shot}.png", "decision": s.state,
                 "by": s.latest.by if s.latest else None, "at": s.latest.at.isoformat() if s.latest else None,
                 "comment": s.latest.comment if s.latest else None} for s in state.shots]

    def panel(self, job: Job, shot: str) -> Path:
        from pipeline.store import open_store

        plan = self.plan_of(job)
        for s in plan.shots:
            if s.shot.id == shot:
                files = open_store(self.settings.store).get(s.keys["storyboard"]) or {}
                if "panel.png" in files:
                    return Path(files["panel.png"])
        raise ServiceError(f"job {job.id} has no panel for shot {shot!r} yet", 404)

    def view(self, db: Session, job: Job) -> dict:
        producer = db.get(User, job.producer_id)
        uri = self.settings.tracking_uri
        url = None
        if job.mlflow_run_id and uri.startswith("http"):  # the UI's run page is under its experiment
            exp = self._progress(job).get("experiment_id") if job.attempt else None
            url = (f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{job.mlflow_run_id}" if exp
                   else f"{uri.rstrip('/')}/#/runs/{job.mlflow_run_id}")
        # a tracking file has no page to link to: how to open it (the run id says which run)
        opener = (f"mlflow ui --backend-store-uri {uri}" if job.mlflow_run_id and not url else None)
        return {"id": job.id, "producer": producer.username if producer else None, "series": job.series,
                "script_name": job.script_name, "title": job.title, "profile": job.profile, "aspect": job.aspect,
                "budget_yuan": job.budget_yuan, "estimate_yuan": job.estimate_yuan, "status": job.status,
                "stopped_reason": job.stopped_reason, "attempt": job.attempt, "submission_id": job.submission_id,
                "approval_gate": job.approval_gate, "batch": job.batch, "runner": job.runner,
                "created_at": job.created_at.isoformat(), "updated_at": job.updated_at.isoformat(),
                "error": job.error, "progress": self.progress(job), "mlflow_run_id": job.mlflow_run_id,
                "mlflow_run_url": url, "mlflow_open": opener, "files": self.files(job)}


_HERE = threading.Lock()  # one in-process render at a time: it redirects this process's output


def _invoke_cli(args: list[str], log: Path, env: dict[str, str]) -> int:
    """``anim ARGS`` in this process, stdout and stderr to ``log``, in the environment a Ray job
    of the service gets (``env``) and with no Ray cluster reachable (``RAY_ADDRESS`` points
    nowhere for its duration): its exit code."""
    from contextlib import redirect_stderr, redirect_stdout

    import click

    from pipeline.cli import app

    with _HERE, log.open("w", encoding="utf-8") as out, redirect_stdout(out), redirect_stderr(out):
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"} | {"RAY_ADDRESS": "127.0.0.1:1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            code = app(args, standalone_mode=False, prog_name="anim")
            return int(code or 0)
        except click.exceptions.Exit as exc:
            return int(exc.exit_code)
        except click.ClickException as exc:
            exc.show(file=out)
            return 2
        except SystemExit as exc:
            return int(exc.code or 0) if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - whatever it was goes to Ray next
            out.write(f"error: {type(exc).__name__}: {exc}\n")
            return 1
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def loop(service: JobService, stop: threading.Event, period_s: float = 0.5) -> None:
    """The dispatcher thread: a tick every ``period_s`` until ``stop``; a tick that fails is
    logged and the next one tries again (the table is the truth, nothing is lost)."""
    import logging

    log = logging.getLogger("anim.service")
    while not stop.is_set():
        try:
            service.tick()
        except Exception:  # noqa: BLE001 - keep dispatching; the cause is in the log
            log.exception("dispatcher tick failed")
        stop.wait(period_s)
