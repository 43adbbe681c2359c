"""Chaos runs (#11.7): renders disturbed for real, and what they left behind.

Each render is ``anim render`` run as its own process (its own local Ray cluster, loopback only),
all of them recording into one SQLite tracking file. First one undisturbed reference render
(the frame checksums of its episode.mp4, ffmpeg ``framemd5``); then, per round, each of:

* ``worker``  — SIGKILL a random busy Ray worker of the render mid-render (Ray retries the node);
* ``encoder`` — the render's ffmpeg is a wrapper that SIGKILLs itself on its first invocation;
* ``driver``  — SIGKILL the render's driver once some nodes finished, then render again (resume);
* ``twice``   — two renders of the script at once on one store.

Each disturbance renders into a store of its own (the killed and resumed renders share one, the
two concurrent renders share one), so every node of it is computed under the disturbance.
Printed per run and in total: renders finished / failed (with their one line), outputs
identical to the reference (frame checksums), nodes billed twice (a content key with more than
one finished spend note), and spend recorded vs spent: recorded = the episode's spend the last
render reported (``cost.json`` ``episode_spent_yuan``), spent = every attempt's priced time in
the store's spend notes, failed and partial ones included.

    .venv/bin/python experiments/chaos.py --rounds 1 [--seed 7] [--keep DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import imageio_ffmpeg  # noqa: E402
import psutil  # noqa: E402

from pipeline.calibration import Calibration  # noqa: E402
from pipeline.config import resolve_profile  # noqa: E402
from pipeline.cost import PriceCatalog  # noqa: E402
from pipeline.ledger import episode_ledger  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from stages.script import load_episode  # noqa: E402

SCRIPT = REPO / "examples" / "shotlist.yaml"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
RENDER_TIMEOUT_S = 240  # a render that has not ended by then is killed and counted as failed (hung)
KINDS = ("worker", "encoder", "driver", "twice")


@dataclass
class Outcome:
    kind: str
    finished: int = 0
    failed: list[str] = field(default_factory=list)  # each failed render's last line
    identical: int = 0
    compared: int = 0
    billed_twice: int = 0
    recorded_yuan: float = 0.0
    spent_yuan: float = 0.0
    note: str = ""


def plan():
    episode = load_episode(SCRIPT)
    prices = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.10)
    return make_plan(episode, resolve_profile("draft"), prices=prices,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     script_sha256=hashlib.sha256(episode.model_dump_json().encode()).hexdigest())


def framemd5(video: Path) -> list[str]:
    out = subprocess.run([FFMPEG, "-v", "error", "-i", str(video), "-map", "0:v", "-f", "framemd5", "-"],
                         capture_output=True, text=True, check=True).stdout
    return [line.rsplit(",", 1)[-1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def killing_ffmpeg(folder: Path) -> Path:
    """An ffmpeg that SIGKILLs itself on its first invocation (a marker folder remembers) and is the
    real one otherwise."""
    path, marker = folder / "ffmpeg-kill-once", folder / "ffmpeg-killed"
    path.write_text(f'#!/bin/sh\nif mkdir "{marker}" 2>/dev/null; then kill -9 $$; fi\nexec "{FFMPEG}" "$@"\n')
    path.chmod(0o755)
    return path


class Render:
    """``anim render`` as a process of its own."""

    tracking: Path = Path("mlflow.db")  # one SQLite file for every render of the run (set by main)

    def __init__(self, store: Path, out: Path, ffmpeg: Path | None = None):
        config = self.tracking.parent / "config.toml"  # an empty config: no user or studio file applies
        config.touch()
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO),
               "ANIM_STORE": str(store),
               "MLFLOW_TRACKING_URI": f"sqlite:///{self.tracking}", "MLFLOW_DISABLE_TELEMETRY": "true",
               "ANIM_CONFIG": str(config)}
        if ffmpeg is not None:
            env["IMAGEIO_FFMPEG_EXE"] = str(ffmpeg)
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "render", str(SCRIPT), "--profile", "draft",
                                      "--out", str(out), "--no-progress"], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()

    def wait(self) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=RENDER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            _, err = self.proc.communicate()
            return -1, f"hung: no end within {RENDER_TIMEOUT_S} s"
        lines = [ln for ln in (err or "").splitlines() if ln.strip()]
        return self.proc.returncode, (lines[-1] if lines else "") + (f"  [{len(lines)} lines]" if len(lines) > 1 else "")

    def workers(self) -> list[psutil.Process]:
        """This render's Ray workers busy with a node (``ray::<task>``, not idle, not an agent)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                name = p.name()
            except psutil.NoSuchProcess:
                continue
            if name.startswith("ray::") and not any(x in name for x in ("IDLE", "Agent", "agent")):
                out.append(p)
        return out

    def kill(self) -> None:
        """SIGKILL the driver (its Ray cluster's processes follow it)."""
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass


def settle(store_dir: Path, p) -> tuple[int, float]:
    """(nodes billed twice, spend in the store's notes)."""
    book = episode_ledger(p, open_store(store_dir))
    finished = Counter(n.key for n in book.notes if n.why is None)
    return sum(1 for c in finished.values() if c > 1), book.total_yuan


def reported(out: Path) -> float | None:
    cost = out / "cost.json"
    return json.loads(cost.read_text())["episode_spent_yuan"] if cost.exists() else None


def judge(o: Outcome, results: list[tuple[int, str, Path]], reference: list[str], store: Path, p) -> Outcome:
    recorded = []
    for rc, line, out in results:
        if rc == 0:
            o.finished += 1
            o.compared += 1
            o.identical += framemd5(out / "episode.mp4") == reference
            if reported(out) is not None:
                recorded.append(reported(out))
        else:
            o.failed.append(line)
    o.billed_twice, o.spent_yuan = settle(store, p)
    o.recorded_yuan = max(recorded) if recorded else 0.0
    return o


def disturb(kind: str, work: Path, reference: list[str], p, rng: random.Random) -> Outcome:
    o = Outcome(kind)
    store = work / "store"
    if kind == "worker":
        r = Render(store, work / "out")
        deadline, victim, book = time.monotonic() + 120, None, open_store(store)
        want = rng.randint(0, len(p.shots) * 2)  # kill once this many nodes have finished
        while victim is None and r.proc.poll() is None and time.monotonic() < deadline:
            busy = r.workers()
            if busy and sum(1 for n in episode_ledger(p, book).notes if n.why is None) >= want:
                victim = rng.choice(busy)
                try:
                    o.note = f"killed {victim.name()} after {want} node(s)"
                    victim.kill()
                except psutil.NoSuchProcess:
                    victim = None
            time.sleep(0.05)
        o.note = o.note or "no busy worker found to kill"
        rc, line = r.wait()
        return judge(o, [(rc, line, work / "out")], reference, store, p)
    if kind == "encoder":
        r = Render(store, work / "out", ffmpeg=killing_ffmpeg(work))
        rc, line = r.wait()
        o.note = "encoder killed once" if (work / "ffmpeg-killed").exists() else "encoder never started"
        return judge(o, [(rc, line, work / "out")], reference, store, p)
    if kind == "driver":
        r = Render(store, work / "out-killed")
        book = open_store(store)
        deadline = time.monotonic() + 120
        # Kill it once a random number of nodes have their spend on record (or at once if it ends).
        want = rng.randint(1, len(p.shots) * 2)
        while r.proc.poll() is None and time.monotonic() < deadline:
            done = sum(1 for n in episode_ledger(p, book).notes if n.why is None)
            if done >= want:
                break
            time.sleep(0.05)
        killed_early = r.proc.poll() is None
        r.kill()
        r.wait()
        o.note = f"driver killed after {want} node(s)" if killed_early else "the render ended before the kill"
        rc, line = Render(store, work / "out").wait()
        return judge(o, [(rc, line, work / "out")], reference, store, p)
    # twice: two renders of one script at once on one store
    a, b = Render(store, work / "out-a"), Render(store, work / "out-b")
    (rca, la), (rcb, lb) = a.wait(), b.wait()
    return judge(o, [(rca, la, work / "out-a"), (rcb, lb, work / "out-b")], reference, store, p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kinds", default=",".join(KINDS), help="which disturbances, comma-separated")
    ap.add_argument("--keep", type=Path, help="keep the stores, outputs and tracking file here")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 10:
        raise SystemExit("--rounds: 1 to 10 (each round is several renders)")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        raise SystemExit(f"--kinds: any of {', '.join(KINDS)}")
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="anim-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    Render.tracking = root / "mlflow.db"
    p = plan()
    t0 = time.monotonic()
    # 1. The undisturbed reference.
    ref_dir = root / "reference"
    ref_dir.mkdir(exist_ok=True)
    rc, line = Render(ref_dir / "store", ref_dir / "out").wait()
    if rc != 0:
        raise SystemExit(f"the undisturbed reference render failed: {line}")
    reference = framemd5(ref_dir / "out" / "episode.mp4")
    print(f"reference: {len(reference)} frames, {len(p.shots)} shots, "
          f"¥{settle(ref_dir / 'store', p)[1]:.5f} spent, {time.monotonic() - t0:.0f} s")
    # 2. Rounds of disturbed renders, all tracked in one SQLite file (root/mlflow.db).
    outcomes: list[Outcome] = []
    print(f"{'round':>5} {'kind':<8} {'finished':>8} {'failed':>6} {'identical':>9} {'billed 2x':>9} "
          f"{'recorded ¥':>11} {'spent ¥':>9}  note")
    for rnd in range(1, args.rounds + 1):
        for kind in kinds:
            work = root / f"r{rnd}-{kind}"
            work.mkdir(exist_ok=True)
            o = disturb(kind, work, reference, p, rng)
            outcomes.append(o)
            print(f"{rnd:>5} {kind:<8} {o.finished:>8} {len(o.failed):>6} {o.identical:>4}/{o.compared:<4} "
                  f"{o.billed_twice:>9} {o.recorded_yuan:>11.5f} {o.spent_yuan:>9.5f}  {o.note}")
            for line in o.failed:
                print(f"{'':>15}failed: {line}")
    # 3. In total.
    fin, failed = sum(o.finished for o in outcomes), sum(len(o.failed) for o in outcomes)
    ident, comp = sum(o.identical for o in outcomes), sum(o.compared for o in outcomes)
    rec, spent = sum(o.recorded_yuan for o in outcomes), sum(o.spent_yuan for o in outcomes)
    print(f"total: {fin} renders finished, {failed} failed; {ident}/{comp} outputs identical to the undisturbed "
          f"one; {sum(o.billed_twice for o in outcomes)} nodes billed twice; spend recorded ¥{rec:.5f} vs spent "
          f"¥{spent:.5f} (unrecorded ¥{spent - rec:.5f}); {time.monotonic() - t0:.0f} s; files in {root}")


if __name__ == "__main__":
    main()
