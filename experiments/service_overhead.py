"""What the render service costs and holds, measured side by side in one run (issue #12).

1. **Overhead**: one episode through the service (submit → succeeded, as the client sees it)
   against a direct ``anim render`` of the same script on an empty store of its own (which starts
   its own local Ray); target ≤ 10 % more wall.
2. **No-op re-render** through the warm service (every node in the store): target ≤ 2 s; beside
   it, the same no-op as a direct ``anim render``.
3. **Six queued episodes on two cores** (one batch): wall from submit to the last one done, the
   share of it the 2 cores' Ray slots were busy in nodes (Σ resource-seconds of the six ledgers /
   2 × wall) and the processors' (the machine's busy time in ``/proc/stat``, with the CPU seconds of
   the head's processes, the drivers and the service by kind); target ≥ 85 %. ``--repeat N`` makes
   each episode a Fountain script played N times over (a 3.3-minute episode from the sample at 3).
   Side by side: the service's default queue policy (a render per core,
   more while a slot is idle) and the old fixed two at once (``service_max_renders = 2``), each on
   episodes of its own (nothing cached).
4. **20 concurrent submissions from 3 users** (one thread each, at once): how many were accepted,
   finished, lost (accepted but missing or not finished) and duplicated (a job with two
   succeeded Ray submissions, or two jobs for one submission).

Everything real: a Ray head this script starts and stops, ``anim serve`` as its own process,
SQLite job table and MLflow file, ffmpeg. ``--quick`` shrinks 3 and 4 (3 episodes, 6 submissions);
``--queued-only`` runs 3 alone.

    .venv/bin/python experiments/service_overhead.py [--script examples/shotlist.yaml] [--quick] [--queued-only]
        [--repeat 3 --script examples/episode_en.fountain]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.service.client import ServiceClient, ServiceError  # noqa: E402
from pipeline.service.cluster import local_endpoint, stop_local_head  # noqa: E402
from pipeline.service.process import ServiceProcess, add_account, isolated_env  # noqa: E402


def variant(script: Path, tag: str, folder: Path, shots: int | None = None, repeat: int = 1) -> Path:
    """The script with ``tag`` in its title and every shot's content (new content keys): in every
    action of a YAML shot list, in every scene's location of a Fountain screenplay. ``repeat``: a
    Fountain body played that many times over, each time in new locations (a longer episode)."""
    if script.suffix == ".fountain":
        if shots is not None:
            raise SystemExit(f"{script}: a Fountain script cannot be cut to {shots} shot(s) here; use a YAML shot list")
        text = script.read_text(encoding="utf-8")
        title, _, body = text.partition("\n\n")  # the title page ends at the first blank line
        title = re.sub(r"^(Title:[ \t]*.*)$", rf"\1 {tag}", title, count=1, flags=re.M)
        heading = re.compile(r"^((?:INT|EXT|EST|I/E)[./][^-#\n]*?)(\s+-\s+)", re.M)
        bodies = [heading.sub(rf"\1 {tag.upper()}{f' R{i + 1}' if repeat > 1 else ''}\2", body) for i in range(repeat)]
        path = folder / f"{script.stem}-{tag}.fountain"
        path.write_text(title + "\n\n" + "\n\n".join(bodies), encoding="utf-8")
        return path
    if repeat != 1:
        raise SystemExit(f"{script}: --repeat is for Fountain screenplays")
    data = yaml.safe_load(script.read_text(encoding="utf-8"))
    data["title"] = f"{data['title']} {tag}"
    kept = 0
    for scene in data["scenes"]:
        if shots is not None:
            scene["shots"] = scene["shots"][:max(0, shots - kept)]
            kept += len(scene["shots"])
        for shot in scene["shots"]:
            shot["action"] = f"{shot['action']} ({tag})"
    data["scenes"] = [s for s in data["scenes"] if s["shots"]]
    path = folder / f"{script.stem}-{tag}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def direct_render(env: dict, script: Path, out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "render", str(script), "--out", str(out), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"direct render failed: {done.stderr[-2000:]}")
    return time.perf_counter() - t0


def through_service(client: ServiceClient, script: Path, **kw) -> tuple[float, dict]:
    t0 = time.perf_counter()
    job = client.submit(script, **kw)
    done = client.wait(job["id"], timeout_s=1800, poll_s=0.05)
    wall = time.perf_counter() - t0
    if done["status"] != "succeeded":
        raise SystemExit(f"job {job['id']} {done['status']}: {done['error']}\n{client.logs(job['id'])}")
    return wall, done


def busy_seconds(data_dir: Path, job_id: int) -> float:
    cost = json.loads((data_dir / "jobs" / str(job_id) / "out" / "cost.json").read_text())
    return sum(r["seconds"] * r["units"] for r in cost["records"] if not r["cached"] and r["resource"] == "cpu")


class CpuSampler(threading.Thread):
    """CPU seconds the head's processes used while it runs, by kind, and the whole machine's busy
    time (``/proc/stat``: every process, other users' too).

    Kinds: ``nodes`` (Ray workers running nodes, ``ray::…``) with the ``ffmpeg`` they run, render
    ``drivers`` (``pipeline render``), the ``service`` (``anim serve``: planning, polling), ``worker
    start-up`` (a Ray worker before its first task names it), ``job supervisors`` (one Ray actor per
    job), the ``dashboard`` (with its agents: the Jobs API and the cluster status the queue policy
    reads), ``raylet``, ``gcs`` and ``other`` Ray processes. Every process in the head's session, the
    drivers of this run and the service are sampled twice a second; one that ends between two
    samples loses at most its last half second."""

    COARSE = {"nodes": "nodes", "ffmpeg": "nodes", "drivers": "drivers", "service": "service"}

    def __init__(self, pgid: int, marker: str, service_pid: int | None = None):
        super().__init__(daemon=True)
        self.pgid, self.marker, self.service_pid, self.stop, self.last = pgid, marker, service_pid, threading.Event(), {}
        self.started: dict = {}  # (pid, created) -> its CPU seconds when Ray named it: its start-up

    @staticmethod
    def kind(cmdline: list[str]) -> str:
        text = " ".join(cmdline)
        name = Path(cmdline[0]).name if cmdline else ""
        if "pipeline render" in text:
            return "drivers"
        if "ffmpeg" in name:
            return "ffmpeg"
        if text.startswith("ray::"):
            return ("job supervisors" if "JobSupervisor" in text else
                    "dashboard" if "DashboardAgent" in text or "RuntimeEnvAgent" in text else "nodes")
        if "default_worker.py" in text:
            return "worker start-up"
        if "dashboard" in text:
            return "dashboard"
        return "raylet" if name == "raylet" else "gcs" if name == "gcs_server" else "other"

    @staticmethod
    def machine() -> tuple[float, float]:
        """(busy, total) jiffies of all CPUs since boot."""
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    def sample(self) -> None:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                text = " ".join(p.info["cmdline"] or [])
                # the head's process group, render drivers of this run (a session of their own), the service
                if p.pid == self.service_pid:
                    kind = "service"
                elif os.getsid(p.pid) == self.pgid or ("pipeline render" in text and self.marker in text):
                    kind = self.kind(p.info["cmdline"] or [])
                else:
                    continue
                t = p.cpu_times()
                key = (p.pid, p.create_time())
                prev = self.last.get(key)
                if prev and prev[0] == "worker start-up" and kind != "worker start-up":
                    self.started[key] = prev[1]  # its CPU until Ray named it (its first task or actor) was start-up
                self.last[key] = (kind, t.user + t.system)
            except (psutil.Error, ProcessLookupError, OSError):
                continue

    def run(self) -> None:
        self.sample()
        self.first, self.machine0 = dict(self.last), self.machine()
        while not self.stop.wait(0.5):
            self.sample()

    def seconds(self) -> tuple[dict[str, float], float]:
        """CPU seconds by kind, and the machine's busy share of all its cores since ``start``."""
        self.stop.set()
        self.join()
        self.sample()
        busy, total = (b - a for a, b in zip(self.machine0, self.machine()))
        used: dict[str, float] = Counter()
        for key, (kind, cpu) in self.last.items():
            base = self.first.get(key, (kind, 0.0))[1]
            if key in self.started:  # start-up, then nodes
                used["worker start-up"] += self.started[key] - base
                base = self.started[key]
            used[kind] += cpu - base
        return dict(used), (busy / total if total > 0 else 0.0)


def queued_batch(client: ServiceClient, root: Path, script: Path, n: int, tag: str, pgid: int | None = None,
                 service_pid: int | None = None, repeat: int = 1) -> dict:
    """``n`` new episodes submitted as one batch; wall to the last one done, node core-seconds, the
    most renders the job table had active at once (from each job's events), the CPU seconds the
    head's processes and the service used meanwhile, by kind, and the machine's busy share."""
    batch = [variant(script, f"queued-{tag}{i}", root, repeat=repeat) for i in range(n)]
    sampler = CpuSampler(pgid, str(root), service_pid) if pgid else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    made = client.submit(batch)["jobs"]
    done = [client.wait(j["id"], timeout_s=3600, poll_s=0.1) for j in made]
    wall = time.perf_counter() - t0
    cpu, machine = sampler.seconds() if sampler else ({}, None)
    busy = sum(busy_seconds(root / "data", j["id"]) for j in done)
    ids = {j["id"] for j in done}
    with sqlite3.connect(root / "data" / "service.db") as db:  # the job table's events, in order
        rows = db.execute("SELECT job_id, status FROM job_events ORDER BY id").fetchall()
    active, most = set(), 0
    for job_id, status in rows:
        if job_id in ids:
            (active.add if status in ("planning", "rendering") else active.discard)(job_id)
            most = max(most, len(active))
    return {"episodes": n, "wall_s": wall, "busy_core_s": busy, "busy_share": busy / (2 * wall), "most_at_once": most,
            "succeeded": sum(j["status"] == "succeeded" for j in done), "cpu_s": cpu,
            "cpu_share": {k: v / (2 * wall) for k, v in cpu.items()}, "machine_busy": machine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", type=Path, default=REPO / "examples" / "shotlist.yaml")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="3 only: each queued episode is a Fountain --script "
                    "played this many times over (a longer episode: the sample 16:9 at 3 is 3.3 minutes)")
    ap.add_argument("--queued-only", action="store_true", help="Only 3: the queued batch under both policies.")
    args = ap.parse_args()
    queued, concurrent = (3, 6) if args.quick else (6, 20)
    root = Path(tempfile.mkdtemp(prefix="anim-service-overhead-"))
    env = isolated_env(root, ANIM_SERVICE_MAX_RENDERS="2")
    head = local_endpoint(root / "data", num_cpus=2)
    results: dict = {}
    try:
        tokens = {name: add_account(env, name) for name in ("mei", "kai", "lin")}
        with ServiceProcess(env, log=root / "serve.log") as service:
            mei = ServiceClient(service.url, tokens["mei"])
            if not args.queued_only:
                # 1. the same episode, direct and through the service, each on an empty store
                script = variant(args.script, "overhead", root)
                direct_env = {**env, "ANIM_STORE": str(root / "store-direct")}
                direct = direct_render(direct_env, script, root / "direct")
                served, _ = through_service(mei, script)
                results["overhead"] = {"direct_s": direct, "service_s": served, "ratio": served / direct}
                # 2. the no-op, twice each (the first warm-up excluded)
                through_service(mei, script)
                noop_service, job = through_service(mei, script)
                noop_direct = direct_render(direct_env, script, root / "direct-again")
                results["noop"] = {"service_s": noop_service, "direct_cli_s": noop_direct, "runner": job["runner"]}
            else:  # a warm-up render: the head's workers and caches as parts 1 and 2 would leave them
                through_service(mei, variant(args.script, "warm-up", root))
            # 3. six queued episodes on two cores, one batch: first with two at once, fixed
            results["queued_fixed"] = queued_batch(mei, root, args.script, queued, "fixed", head.pgid,
                                                   service.proc.pid, args.repeat)
            if not args.queued_only:
                # 4. concurrent submissions from three users
                small = [variant(args.script, f"burst{i}", root, shots=1) for i in range(concurrent)]
                clients = {name: ServiceClient(service.url, tok) for name, tok in tokens.items()}
                accepted, refused, lock, gate = [], [], threading.Lock(), threading.Barrier(concurrent)

                def one(i: int) -> None:
                    client = clients[list(clients)[i % 3]]
                    gate.wait()
                    try:
                        job = client.submit(small[i])
                        with lock:
                            accepted.append((list(clients)[i % 3], job["id"]))
                    except ServiceError as exc:
                        with lock:
                            refused.append(str(exc))

                threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                finished = [clients[user].wait(jid, timeout_s=3600, poll_s=0.2) for user, jid in accepted]
                listed = {j["id"] for c in clients.values() for j in c.jobs()}
                ray_ok = Counter(j.metadata.get("job") for j in head.client().list_jobs()
                                 if str(j.status).endswith("SUCCEEDED"))
                results["concurrent"] = {
                    "submitted": concurrent, "accepted": len(accepted), "refused": refused,
                    "finished": sum(j["status"] == "succeeded" for j in finished),
                    "lost": sum(1 for _, jid in accepted if jid not in listed) +
                            sum(j["status"] != "succeeded" for j in finished),
                    "duplicated": sum(1 for _, jid in accepted if ray_ok[str(jid)] > 1) +
                                  (len(accepted) - len({jid for _, jid in accepted}))}
        # 3'. the same batch size under the default queue policy (the same head and data, a new service)
        default_env = {k: v for k, v in env.items() if k != "ANIM_SERVICE_MAX_RENDERS"}
        with ServiceProcess(default_env, log=root / "serve-default.log") as service:
            results["queued"] = queued_batch(ServiceClient(service.url, tokens["mei"]), root, args.script, queued,
                                             "default", head.pgid, service.proc.pid, args.repeat)
    finally:
        stop_local_head(head)
    q, f = results["queued"], results["queued_fixed"]
    if not args.queued_only:
        o, n = results["overhead"], results["noop"]
        print(f"1. one episode ({args.script.name}): direct anim render {o['direct_s']:.1f} s, through the service "
              f"{o['service_s']:.1f} s: {o['ratio'] - 1:+.0%} (target ≤ +10 %)")
        print(f"2. no-op re-render through the warm service {n['service_s']:.2f} s (runner {n['runner']}; "
              f"target ≤ 2 s); direct anim render of the same no-op {n['direct_cli_s']:.1f} s")
    print(f"3. {q['episodes']} queued episodes on 2 cores, default queue policy: {q['succeeded']} succeeded in "
          f"{q['wall_s']:.1f} s, cores busy {q['busy_core_s']:.1f} core-s = {q['busy_share']:.0%} of the wall "
          f"(target ≥ 85 %), at most {q['most_at_once']} at once; fixed two at once: {f['succeeded']} in "
          f"{f['wall_s']:.1f} s, {f['busy_share']:.0%} busy; wall ratio default/fixed {q['wall_s'] / f['wall_s']:.2f}")
    for name, r in (("default", q), ("fixed two", f)):
        share, coarse = r["cpu_share"], Counter()
        for kind, v in share.items():
            coarse[CpuSampler.COARSE.get(kind, "ray")] += v
        detail = ", ".join(f"{k} {v:.0%}" for k, v in sorted(share.items(), key=lambda kv: -kv[1]))
        print(f"   {name}: the machine's 2 cores busy {r['machine_busy']:.0%} of the wall (/proc/stat, every "
              f"process); the head's processes and the service {sum(share.values()):.0%}: nodes with their ffmpeg "
              f"{coarse['nodes']:.0%}, render drivers {coarse['drivers']:.0%}, the service {coarse['service']:.0%}, "
              f"Ray itself {coarse['ray']:.0%} ({detail})")
    if not args.queued_only:
        c = results["concurrent"]
        print(f"4. {c['submitted']} concurrent submissions from 3 users: {c['accepted']} accepted, {c['finished']} "
              f"finished, {c['lost']} lost, {c['duplicated']} duplicated; refused: {c['refused'] or 'none'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
