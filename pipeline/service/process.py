"""``anim serve`` as a child process with an environment of its own: for tests, experiments and
anyone scripting a throw-away service (a temp data dir, a free loopback port).

    env = isolated_env(root)                  # store, MLflow, approvals, service data under root
    head = local_endpoint(root / "data", 2)   # the Ray head, started by the caller (it stops it too)
    add_account(env, "mei", "producer", "mei-secret") -> API token
    with ServiceProcess(env) as service: ServiceClient(service.url, token) …
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipeline.service.cluster import free_ports
from pipeline.service.db import ServiceError

REPO = Path(__file__).resolve().parents[2]


def isolated_env(root: Path, base: dict[str, str] | None = None, **more: str) -> dict[str, str]:
    """``base`` (default: this environment) with every place a render or the service writes moved
    under ``root``, and no cluster, server or token inherited."""
    env = {k: v for k, v in (base or os.environ).items()
           if k not in ("RAY_ADDRESS", "ANIM_SERVER", "ANIM_TOKEN", "ANIM_CONFIG")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "ANIM_STORE": str(root / "store"),
                "ANIM_APPROVALS": str(root / "approvals.db"), "ANIM_SERVICE_DATA": str(root / "data"),
                "XDG_DATA_HOME": str(root / "xdg"), "XDG_CONFIG_HOME": str(root / "xdg-config"),
                "MLFLOW_DISABLE_TELEMETRY": "true", **more})
    return env


def add_account(env: dict[str, str], name: str, role: str = "producer", password: str | None = None) -> str:
    """An account in the service database ``env`` names; returns a new API token for it."""
    from pipeline.config import resolve_settings
    from pipeline.service import auth
    from pipeline.service.db import open_database

    with open_database(resolve_settings(env=env).service_db_url)() as db:
        return auth.new_token(db, auth.add_user(db, name, role, password or f"{name}-secret"))


class ServiceProcess:
    """``anim serve`` on a free loopback port, in a session of its own; ``kill`` is SIGKILL."""

    def __init__(self, env: dict[str, str], port: int | None = None, log: Path | None = None):
        self.env, self.port = env, port or free_ports(1)[0]
        self.log = log or Path(env["ANIM_SERVICE_DATA"]).parent / "serve.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> "ServiceProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(self.port)],
                                         cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"anim serve exited with {self.proc.returncode}: {self.tail()}", 500)
            try:
                if httpx.get(f"{self.url}/api/me", timeout=2).status_code == 401:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise ServiceError(f"anim serve did not answer within {timeout_s:g} s: {self.tail()}", 500)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the service (only it: the Ray head lives in a session of its own)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServiceProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()
