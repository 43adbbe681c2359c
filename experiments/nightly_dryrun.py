"""How long ``anim nightly --dry-run`` takes on a 60-episode series (#13; target under 10 s), and
that planning a night starts no Ray.

    .venv/bin/python experiments/nightly_dryrun.py [--episodes 60] [--repeat 2]

The episodes are made from the shared screenplays (../shared/data/screenplays: every one the
script reader accepts), in turn, each made distinct by its own title and a closing line, into
a temporary folder with a series manifest over them (draft, 16:9 and 9:16: two deliveries an
episode). Timed: the command end to end in a fresh process (``anim nightly SERIES --dry-run``,
an empty store, its own settings folders), and ``plan_night`` in this process, with the
check that neither Ray is imported by it nor a Ray cluster running afterwards. Nothing here is
a test: the times depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCREENPLAYS = REPO.parent / "shared" / "data" / "screenplays"
sys.path.insert(0, str(REPO))


def sources() -> list[Path]:
    """The shared screenplays the script reader accepts and that have shots, largest first."""
    from stages.records import AnimError
    from stages.script import load_episode

    good = []
    for path in sorted(SCREENPLAYS.rglob("*.fountain")):
        try:
            if load_episode(path).shots:
                good.append(path)
        except AnimError:
            continue
    return sorted(good, key=lambda p: -p.stat().st_size)


def make_series(root: Path, n: int) -> Path:
    scripts = sources()
    folder = root / "episodes"
    folder.mkdir()
    for i in range(n):
        text = scripts[i % len(scripts)].read_text(encoding="utf-8-sig")
        body = "\n".join(line for line in text.splitlines() if not line.lower().startswith("title:"))
        (folder / f"ep{i + 1:03d}.fountain").write_text(
            f"Title: Episode {i + 1}\n\n{body}\n\nINT. CORRIDOR - NIGHT\n\nThe lights go out on episode {i + 1}.\n",
            encoding="utf-8")
    manifest = root / "series.toml"
    manifest.write_text(f'name = "Dry run {n}"\nepisodes = ["episodes/ep*.fountain"]\nprofiles = ["draft"]\n'
                        'aspects = ["16:9", "9:16"]\nnight_cap_yuan = 1.0\n\n[schedule]\ncron = "30 2 * * *"\n'
                        'timezone = "Asia/Shanghai"\n', encoding="utf-8")
    return manifest


def env_for(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ANIM_STORE", "ANIM_CONFIG")}
    env.update({"XDG_DATA_HOME": str(root / "data"), "XDG_CACHE_HOME": str(root / "cache"),
                "XDG_CONFIG_HOME": str(root / "config"), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_series(root, args.episodes)
        env = env_for(root)
        anim = Path(sys.executable).with_name("anim")
        # 1. The command, end to end, in a fresh process each time.
        walls = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            done = subprocess.run([str(anim), "nightly", str(manifest), "--dry-run"], env=env, capture_output=True,
                                  text=True, timeout=600)
            walls.append(time.perf_counter() - t0)
            if done.returncode != 0:
                sys.exit(f"anim nightly --dry-run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        summary = [line for line in done.stdout.splitlines() if line.startswith("tonight:")]
        # 2. The planning alone, here: no Ray imported, none running.
        os.environ.update(env)
        from pipeline.config import resolve_settings
        from pipeline.nightly import plan_night
        from pipeline.series import load_series

        settings = resolve_settings()
        t0 = time.perf_counter()
        series = load_series(manifest)
        night = plan_night(series, settings, now=datetime.now(timezone.utc))
        planned = time.perf_counter() - t0
        ray_imported = "ray" in sys.modules
        ray_running = ray_imported and sys.modules["ray"].is_initialized()
    shots = sum(len(t.plan.shots) for t in night.items)
    print(f"series: {args.episodes} episodes × {len(series.deliveries)} deliveries = {len(night.items)} plans, "
          f"{shots} shots, from {len(sources())} shared screenplays")
    print(f"anim nightly --dry-run, fresh process: {', '.join(f'{w:.2f} s' for w in walls)} "
          f"(best {min(walls):.2f} s; target under 10 s)")
    print(f"plan_night in process: {planned:.2f} s ({planned / len(night.items) * 1000:.1f} ms per plan); "
          f"Ray imported: {ray_imported}, Ray running: {ray_running}")
    print(f"the command said: {summary[0] if summary else '(no summary line)'}")
    if ray_running:
        sys.exit("planning a night started Ray")


if __name__ == "__main__":
    main()
