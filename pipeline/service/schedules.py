"""The series schedules the render service runs itself: each manifest's nightly, on time.

Manifests are the ``*.toml`` files in the ``service_series`` folder (default
``<service_data>/series``); drop one in and its schedule is live at the next check, remove it
and it stops. Every ``period_s`` the scheduler asks ``pipeline.nightly.run_due`` which nights are
due: the night records (``nights`` setting) decide, so a night never runs twice — not across a
restart of the service, not beside a cron job or a Kubernetes CronJob calling ``anim nightly``
for the same series — and missed nights follow each manifest's declared policy.

A due night is submitted to this service itself, through its own HTTP API, as the account
``nightly`` (a producer, created on first use, with an API token kept in
``<service_data>/nightly.token``, mode 0600): its jobs sit in the job table beside the
producers' and the page shows them. One series runs at most one night at a time; the series are
independent of each other.
"""
from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from pipeline.service import auth
from pipeline.service.db import ServiceError

ACCOUNT = "nightly"
log = logging.getLogger("anim.service.schedules")


def manifests(folder: Path) -> list[Path]:
    """The series manifests the service runs, in name order (none when the folder is absent)."""
    return sorted(p for p in folder.glob("*.toml") if p.is_file()) if folder.is_dir() else []


def service_url(settings) -> str:
    """This service as a client on this machine reaches it (a wildcard host is reached on loopback)."""
    host = settings.service_host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://{host}:{settings.service_port}"


def account_token(sessions, data: Path) -> str:
    """The ``nightly`` account's API token: the one kept in the data folder while the database still
    knows it, else a new one (the account created first if missing)."""
    path = data / "nightly.token"
    with sessions() as db:
        if path.exists():
            token = path.read_text().strip()
            if auth.user_for(db, bearer=token, cookie=None) is not None:
                return token
        try:
            user = auth.user_named(db, ACCOUNT)
        except ServiceError:
            user = auth.add_user(db, ACCOUNT, "producer")
        token = auth.new_token(db, user, name="service schedules")
    data.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    os.replace(tmp, path)
    return token


class Schedules:
    """Runs due nights of the manifests in ``settings.service_series_dir`` against this service."""

    def __init__(self, settings, sessions, *, url: str | None = None):
        self.settings, self.sessions = settings, sessions
        self.url = url or service_url(settings)
        self.running: dict[Path, threading.Thread] = {}

    def tick(self, now: datetime | None = None) -> list[Path]:
        """Start a night for each manifest with one due at ``now`` and none running; returns the
        manifests started. Which night is due is decided inside ``run_due`` from the night records."""
        from pipeline.nightly import open_nights, due_nights
        from pipeline.series import load_series
        from stages.records import AnimError

        now = now or datetime.now(timezone.utc)
        started = []
        book = open_nights(self.settings)
        for path in manifests(self.settings.service_series_dir):
            if path in self.running and self.running[path].is_alive():
                continue
            try:
                if not due_nights(load_series(path), book, now):
                    continue
            except AnimError as exc:  # a broken manifest stops only its own schedule; said in the log
                log.warning("series %s: %s", path, exc)
                continue
            thread = threading.Thread(target=self._night, args=(path, now), name=f"anim-night-{path.stem}",
                                      daemon=True)
            self.running[path] = thread
            thread.start()
            started.append(path)
        return started

    def _night(self, path: Path, now: datetime) -> None:
        from pipeline.nightly import run_due

        try:
            token = account_token(self.sessions, Path(self.settings.service_data))
            for result in run_due([path], self.settings, now=now, server=self.url, token=token,
                                  on_line=lambda line: log.info("%s: %s", path.stem, line)):
                log.info("series %s night %s: exit %s %s", result.series, result.night, result.exit_code,
                         result.note or "")
        except Exception:  # noqa: BLE001 - the night's records say what ran; the next tick tries again
            log.exception("series %s: the night failed", path)


def loop(schedules: Schedules, stop: threading.Event, period_s: float = 20.0) -> None:
    """The schedules thread: a check every ``period_s`` until ``stop``."""
    while not stop.is_set():
        try:
            schedules.tick()
        except Exception:  # noqa: BLE001 - keep checking; the cause is in the log
            log.exception("schedules tick failed")
        stop.wait(period_s)
