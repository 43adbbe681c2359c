"""The Ray cluster the service submits renders to, through Ray's Jobs API.

Either the studio's cluster (``RAY_ADDRESS`` naming its dashboard, ``http://head:8265``, with
``RAY_AUTH_TOKEN`` when it authenticates) or a local head that the service starts as a process
of its own (its own session, so it outlives a killed service) and finds again on the next start
through ``<data>/ray/head.json``. A local head authenticates with a token of its own
(``RAY_AUTH_MODE=token``), kept beside it in ``<data>/ray/token`` (mode 0600).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stages.records import AnimError

START_TIMEOUT_S = 180.0
IDLE_CPU_BUSY = 0.7  # processors busier than this take no extra render, whatever the slots say


class ClusterError(AnimError):
    """The Ray cluster could not be started, found or reached."""


@dataclass(frozen=True)
class JobsEndpoint:
    """Where the Jobs API answers and how to authenticate to it."""

    dashboard_url: str  # http://127.0.0.1:PORT
    token: str | None
    local: bool  # a head this service started (the code travels by PYTHONPATH, not py_modules)
    pgid: int | None = None  # the local head's process group
    temp_dir: str | None = None  # the local head's Ray session folder, removed when it stops

    def client(self):
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            return JobSubmissionClient(self.dashboard_url, headers=headers)
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, auth: one line
            raise ClusterError(f"the Ray Jobs API at {self.dashboard_url} did not answer: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def load(self, timeout_s: float = 2.0) -> "Load | None":
        """What the cluster's CPUs are doing now, from the dashboard's autoscaler view (refreshed about
        every second); None when the dashboard does not say (the queue then admits no extra render)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            reply = httpx.get(f"{self.dashboard_url}/api/cluster_status", headers=headers, timeout=timeout_s)
            report = reply.json()["data"]["clusterStatus"]["loadMetricsReport"]
            used, total = report["usage"].get("CPU", [0.0, 0.0])
            pending = bool(report.get("resourceDemand") or report.get("pgDemand") or report.get("requestDemand"))
        except Exception:  # noqa: BLE001 - unreachable, refused, an older Ray's layout: unknown
            return None
        try:  # what the machines' processors really do (drivers and Ray's own processes hold no slot)
            nodes = httpx.get(f"{self.dashboard_url}/nodes?view=summary", headers=headers,
                              timeout=timeout_s).json()["data"]["summary"]
            percents = [float(n["cpu"]) for n in nodes if isinstance(n.get("cpu"), (int, float))]
            busy = sum(percents) / len(percents) / 100.0 if percents else None
        except Exception:  # noqa: BLE001 - the slots alone then decide
            busy = None
        return Load(cpus_used=float(used), cpus=float(total), pending=pending, cpu_busy=busy)

    def alive(self) -> bool:
        try:
            self.client().list_jobs()
            return True
        except Exception:  # noqa: BLE001 - anything but an answer means not usable
            return False


@dataclass(frozen=True)
class Load:
    """The cluster's CPUs in use by tasks and actors, its CPUs, and whether work waits for resources."""

    cpus_used: float
    cpus: float
    pending: bool
    cpu_busy: float | None = None  # the nodes' processors, 0…1 (mean), as the dashboard measures them

    @property
    def idle(self) -> bool:
        """A CPU slot free, nothing waiting for one, and processors with room: another render would
        start work at once without slowing the ones running (a render's driver and Ray's own
        processes use processors that no slot accounts for)."""
        room = self.cpu_busy is None or self.cpu_busy < IDLE_CPU_BUSY
        return not self.pending and self.cpus_used < self.cpus and room


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (bound to port 0 by the kernel, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def studio_endpoint(address: str) -> JobsEndpoint:
    """The studio's cluster named by ``RAY_ADDRESS``: its dashboard URL (``http://head:8265``);
    a bare ``host:port`` is taken as the dashboard's. ``RAY_AUTH_TOKEN`` is sent when set."""
    url = address if address.startswith(("http://", "https://")) else f"http://{address}"
    return JobsEndpoint(url, os.environ.get("RAY_AUTH_TOKEN") or None, local=False)


def local_endpoint(data_dir: Path, num_cpus: int | None = None) -> JobsEndpoint:
    """The local head recorded in ``data_dir/ray/head.json`` if it still answers, else a new one."""
    ray_dir = data_dir / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    record = ray_dir / "head.json"
    if record.is_file():
        try:
            known = json.loads(record.read_text())
            endpoint = JobsEndpoint(known["dashboard_url"], _token(ray_dir), local=True, pgid=known.get("pgid"),
                                    temp_dir=known.get("temp_dir"))
        except (ValueError, KeyError, OSError):
            endpoint = None
        if endpoint is not None and endpoint.alive():
            return endpoint
        if endpoint is not None:  # a head that died with its service: what it left in /tmp goes
            _remove_session_dir(endpoint.temp_dir)
    return start_local_head(ray_dir, num_cpus)


def _token(ray_dir: Path) -> str:
    path = ray_dir / "token"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def head_env(token: str) -> dict[str, str]:
    """The environment of a local head: token auth on, no stray cluster to join, nothing to drain."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    return env


def start_local_head(ray_dir: Path, num_cpus: int | None = None, timeout_s: float = START_TIMEOUT_S) -> JobsEndpoint:
    """``ray start --head --block`` as a process of its own session, every fixed default port
    (GCS, dashboard, dashboard agent, Ray client) replaced by a free one, its own short temp dir
    (Ray's socket paths must fit in 107 bytes); recorded in ``head.json`` once its Jobs API answers."""
    token = _token(ray_dir)
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = Path(tempfile.mkdtemp(prefix="anim-ray-", dir="/tmp"))
    log = ray_dir / "ray-start.log"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if importlib.util.find_spec("grpc"):  # Ray's own rule: a client server (on 10001) only with ray[client]
        cmd.append(f"--ray-client-server-port={client}")
    with log.open("wb") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=head_env(token), cwd=ray_dir,
                                start_new_session=True)
    endpoint = JobsEndpoint(f"http://127.0.0.1:{dashboard}", token, local=True, pgid=head.pid,
                            temp_dir=str(temp_dir))
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            raise ClusterError(f"ray start exited with {head.returncode} before the cluster came up; "
                               f"see {log}: {_last_line(log)}")
        if "block forever" in log.read_text(errors="replace") and endpoint.alive():
            break
        if time.monotonic() > deadline:
            stop_local_head(endpoint)
            raise ClusterError(f"the local Ray head did not come up within {timeout_s:g} s; see {log}")
        time.sleep(0.5)
    tmp = ray_dir / "head.json.tmp"
    tmp.write_text(json.dumps({"dashboard_url": endpoint.dashboard_url, "address": f"127.0.0.1:{gcs}",
                               "pgid": head.pid, "temp_dir": str(temp_dir), "started": time.time()}))
    tmp.replace(ray_dir / "head.json")
    return endpoint


def stop_local_head(endpoint: JobsEndpoint, grace_s: float = 60) -> None:
    """SIGTERM the local head's process group, wait, SIGKILL what stays (never ``ray stop``,
    which would end every Ray cluster of the user on the machine)."""
    if not endpoint.pgid:
        return

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(endpoint.pgid, sig)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while signal_group(0) and time.monotonic() < deadline:
        try:  # reap it when it is our child (tests); a head started by an earlier service is not
            os.waitpid(endpoint.pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    _remove_session_dir(endpoint.temp_dir)


def _remove_session_dir(temp_dir: str | None) -> None:
    """Remove a stopped local head's session folder — only one this module made (``/tmp/anim-ray-*``)."""
    if temp_dir and Path(temp_dir).parent == Path("/tmp") and Path(temp_dir).name.startswith("anim-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"
