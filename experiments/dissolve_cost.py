"""What a written dissolve adds to the assembly, measured side by side on a published render's own
shot clips (``shot-<id>.mp4`` beside its ``plan.json``): the plain stream-copy join, the join with a
dissolve on one cut, and with one on every cut that fits; each the median of ``--repeats`` runs, in
wall seconds and in the CPU seconds of the ffmpeg processes (what the node is billed for, and
steadier than wall time on a loaded machine).

    .venv/bin/python experiments/dissolve_cost.py out/episode_en-draft-16x9 [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import assemble, encode, handoffs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("render", type=Path, help="a published render folder (plan.json and shot-<id>.mp4)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plan = json.loads((args.render / "plan.json").read_text(encoding="utf-8"))
    profile, shots = plan["profile"], plan["shots"]
    fps = profile["fps"]
    clips = [args.render / f"shot-{s['scene']['shot']['id']}.mp4" for s in shots]
    frames = [s["frames"] for s in shots]
    codec = encode.codec_args(fps=fps, crf=profile["crf"], preset=profile["x264_preset"])
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    every = handoffs.cut_dissolves(frames, ["DISSOLVE TO:"] * len(frames), fps)
    middle = sorted(every)[len(every) // 2]
    cases = {"cut (stream copy)": [], "one dissolve": [assemble.Dissolve(middle, every[middle])],
             f"{len(every)} dissolves (every cut)": [assemble.Dissolve(k, n) for k, n in every.items()]}
    with tempfile.TemporaryDirectory() as work:
        seconds, cpu = {}, {}
        for name, dissolves in cases.items():
            runs, cpus = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), _children_cpu()
                assemble.concat_clips(clips, Path(work) / "picture.mp4", ffmpeg=ffmpeg, dissolves=dissolves, fps=fps,
                                      codec=codec)
                runs.append(time.perf_counter() - t0)
                cpus.append(_children_cpu() - c0)
            seconds[name], cpu[name] = statistics.median(runs), statistics.median(cpus)
        # for scale, the other way to draw dissolves: the whole picture decoded and encoded again
        assemble.concat_clips(clips, Path(work) / "cut.mp4", ffmpeg=ffmpeg)
        runs, cpus = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), _children_cpu()
            subprocess.run([ffmpeg, "-v", "error", "-y", "-threads", "1", "-i", str(Path(work) / "cut.mp4"), *codec,
                            str(Path(work) / "again.mp4")], check=True)
            runs.append(time.perf_counter() - t0)
            cpus.append(_children_cpu() - c0)
        name = "whole picture encoded again"
        seconds[name], cpu[name] = statistics.median(runs), statistics.median(cpus)
    cost = json.loads((args.render / "cost.json").read_text(encoding="utf-8"))
    assembly = sum(r["seconds"] for r in cost["records"] if r["stage"] == "assemble" and not r["cached"])
    render = sum(r["seconds"] for r in cost["records"] if not r["cached"])
    base, base_cpu = seconds["cut (stream copy)"], cpu["cut (stream copy)"]
    print(f"{args.render.name}: {len(shots)} shots, {sum(frames)} frames at {fps} fps, "
          f"{profile['short_side']}p crf {profile['crf']} {profile['x264_preset']}")
    for name, s in seconds.items():
        c = cpu[name]
        print(f"  {name:28s} wall {s:7.3f} s ({s / base:5.1f}x the cut)   cpu {c:7.3f} s ({c / base_cpu:5.1f}x the cut, "
              f"+{c - base_cpu:.3f} s)")
    if assembly:
        print(f"  for scale: that render's assemble node {assembly:.2f} s, all its nodes {render:.1f} s")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
