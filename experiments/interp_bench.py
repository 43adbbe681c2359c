"""Benchmark the in-betweeners side by side: crossfade, DIS flow, RIFE and adaptive, quality and speed, in one run.

    .venv/bin/python experiments/interp_bench.py [--weights ../shared/data/weights/rife/flownet.pkl]
                                                 [--preset fast] [--no-rife] [--hd-only]
                                                 [--sets-only] [--per 6] [--tune-per 12] [--quick]
                                                 [--threshold T] [--subtle-motion M] [--rife-weight W]
                                                 [--fresh-per 12] [--unseen-per 12] [--final-per 12]
                                                 [--per-pair 5] [--subtle-alone]

0. Sets (``experiments/interp_sets.py``: consecutive and wide-step triplets n-k, n, n+k, k = 1…4,
   from bbb, the Pigs GIF and Sintel, split into a tune part and four held-out parts: report;
   fresh, added after report had been looked at; unseen, added after both: bbb and the live-action chaplin clip;
   final, added after unseen had been looked at: more bbb and chaplin triplets): every method
   on every triplet, interleaved (one triplet, all methods, then the next: the machine's load hits
   them alike), per part, set and step: mean PSNR and SSIM over every in-between with a true frame, ms per frame, and the
   adaptive method's share of pairs routed to RIFE; the frame-edge rules ("flow": auto, the
   default; "flow_defer": always; "flow_off": never). Time per frame is taken as a render spends
   it: each method in-betweens the pair at the default profile's ``--per-pair`` times (5: t = 1/6
   … 5/6, the flow's two DIS passes and its confidence shared by them, RIFE one pass each) and the
   call's time is divided by them; the in-betweens scored are every t = j/2k with a true frame. RIFE and adaptive are
   also timed at t = 0.5 alone (one in-between per pair, the reading of the runs before
   2026-12-03) and that ratio is printed beside. On the tune part (``--tune-per`` triplets per
   source and step, denser than the report part's ``--per``): where the flow beats RIFE by how
   much, binned by the confidence's motion and score, the RIFE route's in-between mixed with the
   flow's at RIFE weights 0.25–0.75, and the sweep of the router's two thresholds (score and
   subtle motion), the fallback and the RIFE weight the defaults were chosen from (the adaptive
   output is exactly the flow's, RIFE's mixed with the flow's, or the crossfade's, so the sweep
   recombines the measured outputs). On each held-out part the target check (adaptive ≥ RIFE's
   mean PSNR on every set and step, at ≤ 1/3 of RIFE's time per frame over the part). Then the
   choice protocols (``PROTOCOLS``): the same rule choosing on the tune part, on the parts looked
   at when the defaults were chosen (tune, report, fresh), and on every part looked at before the
   final one (tune, report, fresh, unseen), each checked on the parts it did not choose on. ``--quick``:
   2 triplets per source, step and part (the fresh GIF part is all of it), and only this section.

1. Quality: every triplet (n-1, n, n+1) in ../shared/data/frames, plus triplets decoded from
   its clips (Big Buck Bunny webm, the Pigs in a Polka GIF, the Chaplin mp4); predict n at
   t = 0.5, PSNR (RGB) and SSIM (luma, Wang et al. 2004, Gaussian window σ = 1.5).
   Chaplin duplicates every third frame, but its decoded duplicates are not bitwise equal, so
   holds are measured as their own group: neighbours (k, k) must come back as exact copies.
2. Speed: ms per frame at native size and at 1920×1080 (RIFE at 1080p on 2 frames only), and
   the share of flow time spent inside the DIS ``calc`` calls (timed separately) with three
   in-betweens per keyframe pair (t = 0.25, 0.5, 0.75, a keyframe stride of 4: the flow is paid
   once per pair, warping and blending once per frame), the median of three repeats, with all
   OpenCV threads and on one core. ``--hd-only`` runs just this part.
   "flow_occ" (quality table) is the flow in-betweener with forward-backward occlusion
   weighting (``FlowInterpolator(occlusion=True)``), measured beside the default that leaves it off.
3. Scaling: the same frame list through a pool of 1 and of 2 worker processes, one OpenCV
   thread each: frames/s for each.

Prints a table and logs one MLflow run (experiment "interp_bench": metrics per method, the
table as an artifact). Tracking URI from MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageSequence

from pipeline import tracking
from pipeline.models import Profile
from stages.inbetween import Crossfade, FlowInterpolator, pair_confidence
from stages.inbetween_adaptive import AdaptiveInterpolator, AdaptiveSettings

import interp_sets  # noqa: E402  (experiments/ is the script's own folder)

REPO = Path(__file__).resolve().parents[1]
FRAMES = REPO.parent / "shared" / "data" / "frames"
HD = (1920, 1080)
HD_TS = [0.25, 0.5, 0.75]  # three in-betweens per keyframe pair for the 1080p timing


# --------------------------------------------------------------------------- material


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _video(path: Path, first: int, count: int) -> list[np.ndarray]:
    gen = imageio_ffmpeg.read_frames(str(path))
    w, h = next(gen)["size"]
    out = []
    for i, raw in enumerate(gen):
        if i >= first + count:
            break
        if i >= first:
            out.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3).copy())
    gen.close()
    return out


def triplets() -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(motion triplets, hold triplets): name → (a, middle, b)."""
    trip: dict[str, tuple] = {}
    for d in sorted(p for p in FRAMES.iterdir() if p.is_dir() and p.name != "bbb"):  # every consecutive PNG triple
        pngs = sorted(d.glob("*.png"))
        for i in range(1, len(pngs) - 1):
            trip[f"{d.name}/{pngs[i].stem[-4:]}"] = tuple(_png(p) for p in pngs[i - 1:i + 2])
    for d in sorted((FRAMES / "bbb").glob("triplet_f*")):
        pngs = sorted(d.glob("*.png"))
        trip[f"bbb/{d.name[-5:]}"] = tuple(_png(p) for p in pngs)
    for start in (200, 500):  # two moments of the bbb clip, away from the PNG triplets
        f = _video(FRAMES / "bbb" / "big_buck_bunny_0_30.webm", start, 3)
        trip[f"bbb_webm/{start + 1}"] = tuple(f)
    gif = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(FRAMES / "cartoon_pigs_in_a_polka" / "pigs_in_a_polka.gif"))]
    for i in (5, 15, 25):
        trip[f"pigs_gif/{i}"] = (gif[i - 1], gif[i], gif[i + 1])
    chap = _video(FRAMES / "liveaction_chaplin" / "chaplin.mp4", 60, 12)
    dup = [i for i in range(len(chap) - 1) if cv2.PSNR(chap[i], chap[i + 1]) > 40.0]  # decoded duplicate pairs
    moving = [i for i in range(1, len(chap) - 1) if i - 1 not in dup and i not in dup]
    for i in moving[:2]:
        trip[f"chaplin/{60 + i}"] = (chap[i - 1], chap[i], chap[i + 1])
    holds = {f"chaplin_hold/{60 + i}": (chap[i], chap[i + 1], chap[i].copy()) for i in dup[:3]}
    return trip, holds


# --------------------------------------------------------------------------- metrics


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM on luma (Wang et al. 2004): Gaussian window 11×11, σ = 1.5, K1 = .01, K2 = .03."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64)
    b = cv2.cvtColor(y, cv2.COLOR_RGB2GRAY).astype(np.float64)
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


class TimedDIS:
    """Wraps a DIS object: delegates ``calc`` and adds up the seconds spent in it."""

    def __init__(self, dis):
        self.dis, self.seconds = dis, 0.0

    def calc(self, *args):
        t0 = time.perf_counter()
        out = self.dis.calc(*args)
        self.seconds += time.perf_counter() - t0
        return out


def timed_flow(preset: str, **kwargs) -> tuple[FlowInterpolator, TimedDIS]:
    fi = FlowInterpolator(preset=preset, **kwargs)
    fi._dis = timer = TimedDIS(fi._dis)  # measurement only: the experiment looks inside
    return fi, timer


def hd_flow_timing(pairs: list, preset: str, threads: int | None = None, repeats: int = 3) -> tuple[float, float]:
    """(ms per in-between, share inside DIS calc): medians over ``repeats`` runs of every 1080p
    pair with ``HD_TS``; ``threads`` sets OpenCV's thread count for the run (then restores it)."""
    before = cv2.getNumThreads()
    if threads is not None:
        cv2.setNumThreads(threads)
    try:
        runs = []
        for _ in range(repeats):
            fi, timer = timed_flow(preset)
            fi(pairs[0][0], pairs[0][1], HD_TS)  # warm-up: buffers, thread pools
            timer.seconds = 0.0
            t0 = time.perf_counter()
            for a, b in pairs:
                fi(a, b, HD_TS)
            total = time.perf_counter() - t0
            runs.append((1000 * total / (len(pairs) * len(HD_TS)), timer.seconds / total))
    finally:
        cv2.setNumThreads(before)
    return float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))


# --------------------------------------------------------------------------- scaling


def _worker_init(preset: str) -> None:
    global _FLOW
    cv2.setNumThreads(1)
    _FLOW = FlowInterpolator(preset=preset)


def _worker(pair: tuple[np.ndarray, np.ndarray]) -> int:
    return len(_FLOW(pair[0], pair[1], [0.5]))


def scaling(pairs: list, preset: str) -> dict[int, float]:
    fps = {}
    ctx = mp.get_context("spawn")  # fork after torch/OpenMP start-up can deadlock the workers
    for n in (1, 2):
        with ctx.Pool(n, initializer=_worker_init, initargs=(preset,)) as pool:
            pool.map(_worker, pairs[:n])  # warm the workers
            t0 = time.perf_counter()
            done = sum(pool.map(_worker, pairs, chunksize=1))
            fps[n] = done / (time.perf_counter() - t0)
    return fps


# --------------------------------------------------------------------------- sets


SET_METHODS = ("crossfade", "flow", "flow_defer", "flow_off", "rife", "rife_one", "adaptive")
HELD_OUT = ("report", "fresh", "unseen", "final")  # the parts the declared rule's choice was not made on
# The choice protocols: the parts a setting is chosen on; every other part is held out from that choice.
# "tune" is the declared one; "looked-at" chose the defaults of 2026-12-03 on every part looked at then, whose
# frames span both halves of bbb (held out: unseen, final); "seen" chooses on every part but the final one.
PROTOCOLS = {"tune": ("tune",), "looked-at": ("tune", "report", "fresh"), "seen": ("tune", "report", "fresh", "unseen")}
PER_PAIR = Profile.model_fields["keyframe_stride"].default - 1  # in-betweens per keyframe pair by default


def _scores(outs: list[np.ndarray], truth: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """Mean PSNR and SSIM of in-betweens against their true frames."""
    return (float(np.mean([cv2.PSNR(o, g) for o, g in zip(outs, truth)])),
            float(np.mean([ssim(o, g) for o, g in zip(outs, truth)])))


def pair_times(n: int) -> list[float]:
    """The times of ``n`` in-betweens of a pair as a render asks for them, with 0.5 (the one measured) among them."""
    return sorted({j / (n + 1) for j in range(1, n + 1)} | {0.5})


def sets_bench(args, rife) -> tuple[list[str], dict[str, float]]:
    """Section 0: (table lines, MLflow metrics) of every method on the evaluation sets."""
    if args.per_pair < 1:
        raise SystemExit(f"--per-pair {args.per_pair}: must be >= 1")
    items = interp_sets.triplets(per=args.per, tune_per=args.tune_per, fresh_per=args.fresh_per,
                                 unseen_per=args.unseen_per, final_per=args.final_per)
    from stages.rife import RifeInterpolator

    rife_one = RifeInterpolator(weights=args.weights, threads=args.threads, passes="one")
    methods = {"crossfade": Crossfade(), "flow": FlowInterpolator(preset=args.preset),
               "flow_defer": FlowInterpolator(preset=args.preset, edge="defer"),
               "flow_off": FlowInterpolator(preset=args.preset, edge="off"), "rife": rife, "rife_one": rife_one,
               "adaptive": AdaptiveInterpolator(flow=FlowInterpolator(preset=args.preset), lazy=False,
                                                rife=rife_one if args.rife_passes == "one" else rife,
                                                crossfade=Crossfade(), threshold=args.threshold,
                                                subtle_motion=args.subtle_motion, rife_weight=args.rife_weight,
                                                fallback=args.fallback, fallback_above=args.fallback_above,
                                                subtle_alone=args.subtle_alone)}
    ad = methods["adaptive"]
    ts = pair_times(args.per_pair)
    res: list[dict] = []  # per triplet and method: psnr/ssim (mean over the pair's true in-betweens)/s per frame
    conf_s = flow_only_s = 0.0
    for t in items:
        row: dict = {"t": t}
        outs = {}
        for m, fn in methods.items():
            before = dict(ad.routes)
            t0 = time.perf_counter()
            timed = fn(t.a, t.b, ts)  # the time: at the render's in-between times
            spent = (time.perf_counter() - t0) / len(ts)
            if m == "adaptive":
                row["score"] = ad.scores[-1]
                row["route"] = next(r for r in ad.routes if ad.routes[r] != before[r])
            # the score: at every time with a true frame (the same call when the times agree)
            outs[m] = timed if ts == t.times else fn(t.a, t.b, t.times)
            row[m] = (*_scores(outs[m], t.between), spent)
            if m in ("rife", "adaptive") and len(ts) > 1:  # the one-in-between reading (a pair per frame) beside
                t0 = time.perf_counter()
                fn(t.a, t.b, [0.5])
                row[f"{m}_single_s"] = time.perf_counter() - t0
        for w in SWEEP_MIX:  # the RIFE route's in-betweens at each RIFE weight (RIFE's time: the flow's is paid anyway)
            for key, method in (("mix", "rife"), ("one", "rife_one")):
                mixed = [cv2.addWeighted(r, w, f, 1.0 - w, 0.0) for r, f in zip(outs[method], outs["flow"])]
                row[f"{key}{w:g}"] = (*_scores(mixed, t.between), row[method][2])
        # the confidence's own cost, next to the flow it judges
        fi = methods["flow"]
        t0 = time.perf_counter()
        f01, f10 = fi.flows(t.a, t.b)
        t1 = time.perf_counter()
        row["conf"] = pair_confidence(t.a, t.b, f01, f10)
        row["conf_s"] = (time.perf_counter() - t1) / len(ts)  # per frame, as the other times
        conf_s += time.perf_counter() - t1
        flow_only_s += t1 - t0
        res.append(row)
    lines = [f"sets (experiments/interp_sets.py, {len(items)} triplets; quality: mean over every in-between with a "
             f"true frame, t = j/2k (k = 1: 0.5); time per frame of "
             f"{len(ts)} in-betweens per pair (t = {', '.join(f'{x:.3g}' for x in ts)}); adaptive: RIFE where score < "
             f"{args.threshold} or motion < {args.subtle_motion}, mixed {args.rife_weight:g} RIFE : "
             f"{1 - args.rife_weight:g} flow{' (subtle motion: RIFE alone)' if args.subtle_alone else ''}, RIFE passes "
             f"{args.rife_passes}, fallback {args.fallback} above "
             f"{args.fallback_above:g} inconsistent; rife_one: one RIFE pass per pair, retimed; "
             f"confidence {1000 * conf_s / len(items):.1f} ms per pair = {conf_s / flow_only_s:.1%} of the two DIS flows)",
             f"{'part':6s} {'set':9s} {'k':>1s} {'n':>2s}" + "".join(f" {m + ' dB/SSIM/ms':>26s}" for m in SET_METHODS)
             + f" {'to RIFE':>8s} {'ad-rife dB':>10s} {'ad/rife t':>9s}"]
    metrics: dict[str, float] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in res:
        t = r["t"]
        groups.setdefault((t.part, t.set, t.step), []).append(r)
        groups.setdefault((t.part, "all", 0), []).append(r)
    misses: dict[str, list[str]] = {part: [] for part in HELD_OUT}
    notes: list[str] = []  # adaptive / RIFE time at one in-between per pair, per part
    for (part, name, step), rows in sorted(groups.items(), key=lambda kv: (interp_sets.PARTS.index(kv[0][0]),
                                                                            kv[0][1] == "all", kv[0][1], kv[0][2])):
        mean = {m: [float(np.mean([r[m][i] for r in rows])) for i in range(3)] for m in SET_METHODS}
        share = float(np.mean([r["route"] == "rife" for r in rows]))
        gap, ratio = mean["adaptive"][0] - mean["rife"][0], mean["adaptive"][2] / mean["rife"][2]
        if part in misses and name != "all" and gap < 0.0:
            misses[part].append(f"{name} k={step} {gap:+.2f} dB")
        if part in misses and name == "all" and ratio > 1 / 3:
            misses[part].append(f"time {ratio:.2f}x RIFE's")
        if name == "all" and "rife_single_s" in rows[0]:
            one = np.mean([r["adaptive_single_s"] for r in rows]) / np.mean([r["rife_single_s"] for r in rows])
            metrics[f"{part}.adaptive.time_vs_rife_one_per_pair"] = float(one)
            notes.append(f"{part} {one:.2f}x")
        lines.append(f"{part:6s} {name:9s} {step or '*':>1} {len(rows):2d}" + "".join(
            f" {mean[m][0]:12.2f} {mean[m][1]:.3f} {1000 * mean[m][2]:7.0f}" for m in SET_METHODS)
            + f" {share:8.0%} {gap:+10.2f} {ratio:9.2f}")
        tag = f"{part}.{name}.k{step}" if step else f"{part}.all"
        for m in SET_METHODS:
            metrics[f"{tag}.{m}.psnr_db"], metrics[f"{tag}.{m}.ssim"] = mean[m][0], mean[m][1]
            metrics[f"{tag}.{m}.ms_per_frame"] = 1000 * mean[m][2]
        metrics[f"{tag}.adaptive.rife_share"] = share
    for part, missed in misses.items():
        if any(p == part for p, _, _ in groups):
            lines.append(f"target ({part} part: adaptive >= RIFE mean PSNR on every set and step, <= 1/3 of RIFE's "
                         f"time per frame): {'NOT met: ' + ', '.join(missed) if missed else 'met'}")
            metrics[f"{part}.target_met"] = float(not missed)
    if notes:
        lines.append(f"adaptive / RIFE time at one in-between per pair (t = 0.5 alone, the flow's pair cost on one "
                     f"frame): {', '.join(notes)}")
    tune = [r for r in res if r["t"].part == "tune"]
    lines += tune_study(tune)
    lines += sweep_lines(tune, groups, args, metrics)
    lines += protocol_lines(res, args, metrics)
    return lines, metrics


MOTION_BINS = (0.0, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.01, 0.02, 0.05, 1.0)
SCORE_BINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.01)


def tune_study(tune: list[dict]) -> list[str]:
    """On the tune part: flow - RIFE dB per pair, binned by the confidence's motion and by its score
    (n, mean, share of pairs RIFE wins): which pairs the router should send to RIFE."""
    lines = ["where RIFE beats the flow, tune part (flow - RIFE dB per pair: n, mean, RIFE wins), by motion "
             "(95th percentile flow / long side) and by score (share of the change the flow explains x consistent share)"]
    for feature, bins in (("motion", MOTION_BINS), ("score", SCORE_BINS)):
        cells = []
        for lo, hi in zip(bins, bins[1:]):
            d = [r["flow"][0] - r["rife"][0] for r in tune if lo <= getattr(r["conf"], feature) < hi]
            if d:
                cells.append(f"[{lo:g},{hi:g}) n{len(d)} {np.mean(d):+.2f} {np.mean([x < 0 for x in d]):.0%}")
        lines.append(f"  {feature:6s} " + " | ".join(cells))
    lines.append("the RIFE route's in-between mixed with the flow's, tune part (mix - RIFE dB per pair: n, mean, share "
                 "where the mix beats both), by motion; RIFE weights " + ", ".join(f"{w:g}" for w in SWEEP_MIX[:-1]))
    for w in SWEEP_MIX[:-1]:
        cells = []
        for lo, hi in zip(MOTION_BINS, MOTION_BINS[1:]):
            rows = [r for r in tune if lo <= r["conf"].motion < hi]
            if rows:
                d = [r[f"mix{w:g}"][0] - r["rife"][0] for r in rows]
                best = np.mean([r[f"mix{w:g}"][0] >= max(r["flow"][0], r["rife"][0]) for r in rows])
                cells.append(f"[{lo:g},{hi:g}) n{len(d)} {np.mean(d):+.2f} {best:.0%}")
        lines.append(f"  {w:<6g} " + " | ".join(cells))
    return lines


SWEEP_THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # 1.0: every pair (one pass makes it affordable)
SWEEP_SUBTLE = (0.0, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.01)
SWEEP_FALLBACKS = (None, 0.4)
SWEEP_MIX = (0.25, 0.5, 0.75, 1.0)  # RIFE's weight in the RIFE route's in-between (1: RIFE alone)
SWEEP_PASSES = ("per_time", "one")  # RIFE's passes on the route: one per in-between, or one per pair (retimed)
SWEEP_ALONE = (False, True)  # whether the pairs routed for subtle motion get RIFE alone (the mix: the low-score ones)


def _sweep(rows: list[dict], groups: list[list[dict]]) -> tuple[list[tuple], dict]:
    """Every setting of the grid on ``rows`` (recombined): (mix, above, thr, sub, worst group dB, mean dB, time vs
    RIFE, passes, alone) per setting, and its table cell. Time: the flow and the confidence on every pair, plus the
    routed method's."""
    rife_s = np.mean([r["rife"][2] for r in rows])
    sweep, cell = [], {}
    for alone in SWEEP_ALONE:
        for passes in SWEEP_PASSES:
            for mix in SWEEP_MIX:
                if alone and mix == 1.0:
                    continue  # RIFE alone already on every routed pair
                for above in SWEEP_FALLBACKS:
                    for thr in SWEEP_THRESHOLDS:
                        for sub in SWEEP_SUBTLE:
                            pick = _router(above, thr, sub, mix, passes, alone)
                            got = [r[pick(r)][0] - r["rife"][0] for r in rows]
                            by = {id(r): d for r, d in zip(rows, got)}
                            worst = min(np.mean([by[id(r)] for r in g]) for g in groups)
                            gap = np.mean(got)
                            ratio = _time(rows, pick) / rife_s
                            share = np.mean([pick(r) != "flow" and pick(r) != "crossfade" for r in rows])
                            sweep.append((mix, above, thr, sub, round(float(worst), 2), round(float(gap), 2),
                                          float(ratio), passes, alone))
                            cell[mix, above, thr, sub, passes, alone] = (f"{gap:+.2f}/{worst:+.2f}/{ratio:.2f}x/"
                                                                         f"{share:3.0%}")
    return sweep, cell


def _time(rows: list[dict], pick) -> float:
    """Mean seconds per frame of the routes ``pick`` gives ``rows``: flow and confidence, plus the routed method."""
    return float(np.mean([r["flow"][2] + r["conf_s"] + (r[pick(r)][2] if pick(r) != "flow" else 0.0) for r in rows]))


def _best(sweep: list[tuple], mix: float | None = None, passes: str | None = None) -> tuple | None:
    """The declared rule: within 1/3 of RIFE's time, the best worst set/step; then the best mean; then the
    cheapest; then the smallest thresholds (fewest pairs away from the flow); then RIFE's largest weight; then
    RIFE as published (a pass per in-between) over one pass per pair; then one weight for every routed pair."""
    ok = [x for x in sweep if x[6] <= 1 / 3 and (mix is None or x[0] == mix) and (passes is None or x[7] == passes)]
    return max(ok, key=lambda x: (x[4], x[5], -x[6], -x[2], -x[3], x[0], x[7] == "per_time", not x[8]), default=None)


def sweep_lines(tune: list[dict], groups: dict, args, metrics: dict[str, float]) -> list[str]:
    """The sweep on the tune part and the choice by the declared rule. The adaptive output is the flow's,
    RIFE's mixed with the flow's, or the crossfade's, so any setting's result is the measured outputs
    recombined."""
    tune_groups = [rows for (part, name, _), rows in groups.items() if part == "tune" and name != "all"]
    sweep, cell = _sweep(tune, tune_groups)
    mix, above, thr, sub, worst, gap, ratio, passes, alone = _best(sweep)
    lines = [f"sweep on the tune part (recombined): RIFE where score < threshold (rows) or motion < subtle_motion "
             f"(columns), crossfade where the fallback applies; each cell: mean adaptive - RIFE dB / worst set-step dB / "
             f"time vs RIFE / RIFE share; at the chosen RIFE weight {mix:g}, passes {passes} and subtle motion "
             f"{'RIFE alone' if alone else 'mixed'} (the best cell of each below)"]
    for a in SWEEP_FALLBACKS:
        lines.append(f"  fallback {'none' if a is None else f'crossfade where inconsistent > {a}'}; "
                     f"subtle_motion: " + "  ".join(f"{m:>22g}" for m in SWEEP_SUBTLE))
        for t in SWEEP_THRESHOLDS:
            lines.append(f"    threshold {t:4.2f}        "
                         + "  ".join(f"{cell[mix, a, t, m, passes, alone]:>22s}" for m in SWEEP_SUBTLE))
    for p in SWEEP_PASSES:
        for w in SWEEP_MIX:
            best = _best(sweep, mix=w, passes=p)
            if best:
                lines.append(f"  passes {p}, RIFE weight {w:g}: best within 1/3 of RIFE's time: threshold {best[2]}, "
                             f"subtle_motion {best[3]}{' (RIFE alone)' if best[8] else ''}, fallback "
                             f"{'none' if best[1] is None else best[1]}: {cell[w, best[1], best[2], best[3], p, best[8]]}")
    lines.append(f"chosen on the tune part by the rule (time <= 1/3 of RIFE's; then the best worst set/step, the best "
                 f"mean, the cheapest, the smallest thresholds, RIFE's largest weight, a pass per in-between, one "
                 f"weight): RIFE weight {mix:g}{' (subtle motion: RIFE alone)' if alone else ''}, passes {passes}, "
                 f"fallback {'none' if above is None else f'crossfade above {above}'}, "
                 f"threshold {thr}, subtle_motion {sub} (worst {worst:+.2f} dB, mean {gap:+.2f} dB, {ratio:.2f}x RIFE's "
                 f"time); this run used RIFE weight {args.rife_weight:g}, passes {args.rife_passes}, threshold "
                 f"{args.threshold}, subtle_motion {args.subtle_motion}")
    metrics["chosen_threshold"], metrics["chosen_subtle_motion"], metrics["chosen_rife_weight"] = thr, sub, mix
    metrics["chosen_one_pass"], metrics["chosen_subtle_alone"] = float(passes == "one"), float(alone)
    return lines


def protocol_lines(res: list[dict], args, metrics: dict[str, float]) -> list[str]:
    """Each choice protocol (``PROTOCOLS``): the setting the declared rule picks on its parts (every group of
    every part counts: worst group over (part, set, step)), and on each part it did not choose on, that setting's
    result (recombined) and the target check (adaptive >= RIFE on every set and step, <= 1/3 of RIFE's time)."""
    lines = ["choice protocols (recombined; each held-out part: adaptive - RIFE dB per set and step, time vs RIFE)"]
    for proto, parts in PROTOCOLS.items():
        chosen = [r for r in res if r["t"].part in parts]
        by_group: dict[tuple, list[dict]] = {}
        for r in chosen:
            by_group.setdefault((r["t"].part, r["t"].set, r["t"].step), []).append(r)
        best = _best(_sweep(chosen, list(by_group.values()))[0])
        if best is None:
            lines.append(f"  {proto}: no setting within 1/3 of RIFE's time on {', '.join(parts)}")
            continue
        mix, above, thr, sub, worst, gap, ratio, passes, alone = best
        pick = _router(above, thr, sub, mix, passes, alone)
        metrics[f"protocol.{proto}.chosen_one_pass"] = float(passes == "one")
        metrics[f"protocol.{proto}.chosen_subtle_alone"] = float(alone)
        lines.append(f"  {proto} (chosen on {' + '.join(parts)}, {len(chosen)} triplets): RIFE weight {mix:g}"
                     f"{' (subtle motion: RIFE alone)' if alone else ''}, passes {passes}, fallback "
                     f"{'none' if above is None else f'crossfade above {above}'}, threshold {thr}, subtle_motion {sub} "
                     f"(worst {worst:+.2f} dB, mean {gap:+.2f} dB, {ratio:.2f}x RIFE's time there)")
        for k, v in (("threshold", thr), ("subtle_motion", sub), ("rife_weight", mix)):
            metrics[f"protocol.{proto}.chosen_{k}"] = v
        for part in [p for p in interp_sets.PARTS if p not in parts]:
            rows = [r for r in res if r["t"].part == part]
            if not rows:
                continue
            cells, missed = [], []
            for key in sorted({(r["t"].set, r["t"].step) for r in rows}):
                g = np.mean([r[pick(r)][0] - r["rife"][0] for r in rows if (r["t"].set, r["t"].step) == key])
                cells.append(f"{key[0]} k={key[1]} {g:+.2f}")
                if g < 0.0:
                    missed.append(f"{key[0]} k={key[1]} {g:+.2f} dB")
            t = _time(rows, pick) / np.mean([r["rife"][2] for r in rows])
            if t > 1 / 3:
                missed.append(f"time {t:.2f}x RIFE's")
            share = np.mean([pick(r) not in ("flow", "crossfade") for r in rows])
            lines.append(f"    {part}: {', '.join(cells)}; all {np.mean([r[pick(r)][0] - r['rife'][0] for r in rows]):+.2f}"
                         f" dB, {t:.2f}x RIFE's time, {share:.0%} to RIFE; target "
                         f"{'NOT met: ' + ', '.join(missed) if missed else 'met'}")
            metrics[f"protocol.{proto}.{part}.target_met"] = float(not missed)
    return lines


def _router(above: float | None, thr: float, sub: float, mix: float = 1.0, passes: str = "per_time",
            alone: bool = False):
    """The route a setting gives a measured triplet: the fallback (crossfade) above ``above``'s inconsistent share,
    RIFE (a pass per in-between, or one per pair) mixed ``mix`` : ``1 - mix`` with the flow where the score is
    below ``thr`` or the motion below ``sub`` (with ``alone``: RIFE alone where the motion is below ``sub``, as
    ``AdaptiveInterpolator.weight``), else the flow."""
    kind = "mix" if passes == "per_time" else "one"
    routed, subtle = f"{kind}{mix:g}", f"{kind}{1.0 if alone else mix:g}"

    def pick(r: dict) -> str:
        c = r["conf"]
        if above is not None and c.inconsistent > above:
            return "crossfade"
        if c.motion < sub:
            return subtle
        return routed if c.score < thr else "flow"
    return pick


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=REPO.parent / "shared" / "data" / "weights" / "rife" / "flownet.pkl")
    ap.add_argument("--preset", default="medium", help="flow preset to benchmark")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for RIFE")
    ap.add_argument("--no-rife", action="store_true")
    ap.add_argument("--hd-only", action="store_true", help="only the 1080p flow timing (DIS share, one core)")
    ap.add_argument("--sets-only", action="store_true", help="only section 0, the evaluation sets")
    ap.add_argument("--per", type=int, default=6, help="set triplets per source, step and part")
    ap.add_argument("--tune-per", type=int, default=12, help="the same for the tune part (denser: the choices)")
    ap.add_argument("--quick", action="store_true", help="--sets-only --per 2 --tune-per 2")
    ap.add_argument("--threshold", type=float, default=AdaptiveSettings.model_fields["threshold"].default)
    ap.add_argument("--subtle-motion", type=float, default=AdaptiveSettings.model_fields["subtle_motion"].default)
    ap.add_argument("--rife-weight", type=float, default=AdaptiveSettings.model_fields["rife_weight"].default)
    ap.add_argument("--fresh-per", type=int, default=None, help="bbb triplets per step of the fresh part (default 2x --per)")
    ap.add_argument("--fallback", default=AdaptiveSettings.model_fields["fallback"].default,
                    choices=("none", "crossfade", "hold"))
    ap.add_argument("--fallback-above", type=float, default=AdaptiveSettings.model_fields["fallback_above"].default)
    ap.add_argument("--rife-passes", default=AdaptiveSettings.model_fields["rife_passes"].default,
                    choices=("per_time", "one"))
    ap.add_argument("--unseen-per", type=int, default=None, help="bbb triplets per step of the unseen part (default 2x --per)")
    ap.add_argument("--final-per", type=int, default=None, help="bbb triplets per step of the final part (default 2x --per)")
    ap.add_argument("--subtle-alone", action=argparse.BooleanOptionalAction,
                    default=AdaptiveSettings.model_fields["subtle_alone"].default,
                    help="RIFE alone on the pairs routed for subtle motion")
    ap.add_argument("--per-pair", type=int, default=PER_PAIR, help=(
        f"in-betweens per keyframe pair the times are taken at (default {PER_PAIR}: the default keyframe_stride "
        "less one; 1: t = 0.5 alone, each pair's flow on one frame)"))
    args = ap.parse_args()
    if args.quick:
        args.sets_only, args.per, args.tune_per, args.fresh_per, args.unseen_per, args.final_per = True, 2, 2, 2, 2, 2
    if args.sets_only:
        from stages.rife import RifeInterpolator

        lines, metrics = sets_bench(args, RifeInterpolator(weights=args.weights, threads=args.threads))
        print("\n".join(lines))
        log_run(args, {"sets_per": args.per, "tune_per": args.tune_per, "fresh_per": args.fresh_per,
                       "unseen_per": args.unseen_per, "final_per": args.final_per, "per_pair": args.per_pair,
                       "subtle_alone": args.subtle_alone,
                       "threshold": args.threshold, "subtle_motion": args.subtle_motion,
                       "rife_weight": args.rife_weight, "rife_passes": args.rife_passes,
                       "fallback": args.fallback, "fallback_above": args.fallback_above}, metrics, "\n".join(lines))
        return

    # 1. Material and methods.
    trip, holds = triplets()
    hd = [tuple(cv2.resize(x, HD, interpolation=cv2.INTER_AREA) for x in t) for t in list(trip.values())[:6]]
    hd_pairs = [(a, b) for a, _, b in hd]
    if args.hd_only:
        ms, share = hd_flow_timing(hd_pairs, args.preset)
        ms1, share1 = hd_flow_timing(hd_pairs, args.preset, threads=1)
        print(f"flow {args.preset} 1920x1080, {len(HD_TS)} in-betweens per pair, median of 3: "
              f"{cv2.getNumThreads()} threads {ms:.1f} ms/frame, {share:.1%} inside DIS calc; "
              f"1 core {ms1:.1f} ms/frame, {share1:.1%} inside DIS calc")
        return
    flow, dis_timer = timed_flow(args.preset)
    methods = {"crossfade": Crossfade(), "flow": flow, "flow_occ": FlowInterpolator(preset=args.preset, occlusion=True)}
    if not args.no_rife:
        from stages.rife import RifeInterpolator  # torch only when RIFE is measured

        methods["rife"] = RifeInterpolator(weights=args.weights, threads=args.threads)
    lines = [f"{'triplet':26s} {'size':>10s}" + "".join(f" {m + ' dB/SSIM':>20s}" for m in methods)]

    # 2. Quality and native-size speed, all methods on the same triplets.
    psnr = {m: [] for m in methods}
    sim = {m: [] for m in methods}
    secs = {m: 0.0 for m in methods}
    for name, (a, mid, b) in trip.items():
        row = f"{name:26s} {a.shape[1]:>5d}x{a.shape[0]:<4d}"
        for m, fn in methods.items():
            t0 = time.perf_counter()
            (out,) = fn(a, b, [0.5])
            secs[m] += time.perf_counter() - t0
            psnr[m].append(cv2.PSNR(out, mid))
            sim[m].append(ssim(out, mid))
            row += f" {psnr[m][-1]:13.2f} {sim[m][-1]:.3f}"
        lines.append(row)
    flow_secs = secs["flow"]
    dis_native = dis_timer.seconds
    lines.append(f"{'mean':26s} {'':10s}" + "".join(f" {np.mean(psnr[m]):13.2f} {np.mean(sim[m]):.3f}" for m in methods))
    n = len(trip)
    lines.append(f"{'ms/frame native':26s} {'':10s}" + "".join(f" {1000 * secs[m] / n:19.1f}" for m in methods))

    # 3. Holds: neighbours identical → exact copies, no flow, no net.
    hold_exact = all(
        all(np.array_equal(o, a) for o in fn(a, b, [0.25, 0.5, 0.75])) for a, _, b in holds.values() for fn in methods.values()
    )
    for name, (a, mid, _) in holds.items():
        lines.append(f"{name:26s} hold: copies exact={hold_exact}, vs decoded duplicate "
                     f"{cv2.PSNR(a, mid):.2f} dB (mp4 duplicates differ by up to {int(cv2.absdiff(a, mid).max())} levels)")

    # 4. 1080p: ms per frame (one in-between per pair, t = 0.5, like the quality run), then the
    #    flow in-betweener with three in-betweens per pair: share of its time inside DIS calc,
    #    with all OpenCV threads and on one core.
    hd_ms = {}
    for m, fn in methods.items():
        use = hd[:2] if m == "rife" else hd
        fn(use[0][0], use[0][2], [0.5])  # warm-up (allocations, thread pools)
        t0 = time.perf_counter()
        for a, _, b in use:
            fn(a, b, [0.5])
        hd_ms[m] = 1000 * (time.perf_counter() - t0) / len(use)
    hd3_ms, dis_share_hd = hd_flow_timing(hd_pairs, args.preset)
    hd1_ms, dis_share_hd1 = hd_flow_timing(hd_pairs, args.preset, threads=1)
    lines.append(f"{'ms/frame 1920x1080':26s} {'':10s}" + "".join(f" {hd_ms[m]:19.1f}" for m in methods))
    lines.append(f"flow time inside DIS calc: native {dis_native / flow_secs:.1%}; 1080p with {len(HD_TS)} in-betweens "
                 f"per pair {dis_share_hd:.1%} ({hd3_ms:.1f} ms/frame, {cv2.getNumThreads()} threads), "
                 f"one core {dis_share_hd1:.1%} ({hd1_ms:.1f} ms/frame)")

    # 5. Process scaling of the flow in-betweener, one OpenCV thread per worker.
    pairs = [(a, b) for a, _, b in trip.values()] * 2
    fps = scaling(pairs, args.preset)
    lines.append(f"flow scaling ({len(pairs)} frames, native sizes): 1 process {fps[1]:.1f} frames/s, "
                 f"2 processes {fps[2]:.1f} frames/s ({fps[2] / fps[1]:.2f}x)")
    # 6. The evaluation sets (section 0), in the same run.
    set_metrics: dict[str, float] = {}
    if "rife" in methods:
        set_lines, set_metrics = sets_bench(args, methods["rife"])
        lines += [""] + set_lines
    table = "\n".join(lines)
    print(table)

    # 7. One MLflow run, from this driver only.
    metrics = {}
    for m in methods:
        metrics.update({f"{m}.psnr_db": float(np.mean(psnr[m])), f"{m}.ssim": float(np.mean(sim[m])),
                        f"{m}.ms_per_frame": 1000 * secs[m] / n, f"{m}.ms_per_frame_1080p": hd_ms[m]})
    metrics.update({"flow.dis_share_1080p": dis_share_hd, "flow.dis_share_native": dis_native / flow_secs,
                    "flow.dis_share_1080p_1core": dis_share_hd1, "flow.ms_per_frame_1080p_3t": hd3_ms,
                    "flow.ms_per_frame_1080p_1core": hd1_ms,
                    "flow.fps_1proc": fps[1], "flow.fps_2proc": fps[2], "holds_exact": float(hold_exact)})
    log_run(args, {"flow_preset": args.preset, "triplets": n, "holds": len(holds), "rife_threads": args.threads,
                   "sets_per": args.per, "tune_per": args.tune_per, "fresh_per": args.fresh_per,
                       "unseen_per": args.unseen_per, "final_per": args.final_per, "per_pair": args.per_pair,
                       "subtle_alone": args.subtle_alone,
                   "threshold": args.threshold, "subtle_motion": args.subtle_motion,
                   "rife_weight": args.rife_weight, "rife_passes": args.rife_passes,
                       "fallback": args.fallback, "fallback_above": args.fallback_above}, {**metrics, **set_metrics}, table)


def log_run(args, params: dict, metrics: dict[str, float], table: str) -> None:
    """One MLflow run, from this driver only: params, metrics, the table as an artifact."""
    tracking.mlflow_defaults()
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("interp_bench")
    with mlflow.start_run():
        mlflow.log_params({"flow_preset": args.preset, **params})
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "interp_bench.txt"
            path.write_text(table + "\n")
            mlflow.log_artifact(str(path))


if __name__ == "__main__":
    main()
