"""RenderPlan → Ray task graph → artifacts and a measured ledger. The only module that imports Ray.

Per shot a chain of remote tasks linked by ObjectRefs, so Ray's own dependency resolution
schedules it::

    storyboard ─► keyframes ─► clip (in-betweens streamed into the encoder)
                                   └─────────────┐
    every shot's clip and panel ───────────────► assemble (concat, subtitles, contact sheet)

Before submitting, the driver looks each node's content key up in the artifact store: a hit
is not submitted and costs ¥0 (a cached ledger row). Every executed node returns its
measured wall seconds and the resources it held; the driver prices them.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.cache import ArtifactStore
from pipeline.cost import PriceCatalog
from pipeline.errors import AnimError, StageError
from pipeline.models import Frame, Keyframes, Ledger, LedgerRecord, RenderPlan, ShotPlan
from stages import assemble, encode, inbetween, keyframes, storyboard

CPU = "cpu"


@dataclass(frozen=True)
class Measured:
    """What a node did: ledger entries as (stage, seconds) on ``units`` of ``resource``, and its output."""

    shot: str | None
    timings: list[tuple[str, float]]
    resource: str = CPU
    units: float = 1.0
    value: Any = None
    span: tuple[float, float] = (0.0, 0.0)  # wall-clock (epoch) start and end, for utilization


@dataclass
class RenderResult:
    ledger: Ledger
    outputs: dict[str, Path]
    wall_seconds: float
    ray_init_seconds: float
    stage_seconds: float = field(default=0.0)
    started: float = 0.0  # epoch when the graph was submitted
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (node, start, end) epochs


# --------------------------------------------------------------------------- node bodies
# Plain functions: they run stages and write the store. dag.render() wraps them in Ray.


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, optimize=False, compress_level=3)


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def storyboard_node(shot: ShotPlan, *, width: int, aspect: str, store_root: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    panel = storyboard.render_panel(shot, width=width, aspect=aspect)
    with ArtifactStore(store_root).writer(shot.keys["storyboard"], {"shot": shot.shot.id}) as d:
        _save_png(panel, d / "panel.png")
    return Measured(shot.shot.id, [("storyboard", time.perf_counter() - t0)], span=(started, time.time()))


def keyframes_node(shot: ShotPlan, _storyboard: Measured | None, *, backend: str, width: int, height: int,
                   store_root: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    drawn = keyframes.backend(backend, width=width, height=height)([shot])[0]
    with ArtifactStore(store_root).writer(shot.keys["keyframes"], {"shot": shot.shot.id}) as d:
        for frame in drawn.frames:
            _save_png(frame.image, d / f"key_{frame.index:05d}.png")
    return Measured(shot.shot.id, [("keyframes", time.perf_counter() - t0)], value=drawn,
                    span=(started, time.time()))


def _load_keyframes(store: ArtifactStore, shot: ShotPlan) -> Keyframes:
    files = store.get(shot.keys["keyframes"])
    if files is None:
        raise FileNotFoundError(f"keyframes {shot.keys['keyframes'][:12]} of {shot.shot.id} vanished from the store")
    frames = [Frame(int(name[4:9]), _load_png(path)) for name, path in sorted(files.items())]
    return Keyframes(shot.shot.id, frames)


class _Timed:
    """Wraps the in-between generator to split one node's time between inbetween and encode."""

    def __init__(self, frames: Iterator[np.ndarray]):
        self.frames, self.seconds = frames, 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            t0 = time.perf_counter()
            try:
                frame = next(self.frames)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield frame


def clip_node(shot: ShotPlan, kf: Measured | None, *, interpolation: str, flow_preset: str, fps: int,
              width: int, height: int, crf: int, x264_preset: str, ffmpeg: str, store_root: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    store = ArtifactStore(store_root)
    drawn = kf.value if kf is not None else _load_keyframes(store, shot)
    method = inbetween.interpolator(interpolation, **({"preset": flow_preset} if interpolation == "flow" else {}))
    timed = _Timed(inbetween.shot_frames(drawn, frames=shot.frames, drawings=shot.drawings, interpolate=method))
    with store.writer(shot.keys["clip"], {"shot": shot.shot.id, "frames": shot.frames}) as d:
        encode.encode_clip(timed, d / "clip.mp4", width=width, height=height, fps=fps, crf=crf,
                           preset=x264_preset, threads=1, ffmpeg=ffmpeg, shot=shot.shot.id)
    total = time.perf_counter() - t0
    return Measured(shot.shot.id, [("inbetween", timed.seconds), ("encode", total - timed.seconds)],
                    span=(started, time.time()))


def assemble_node(plan: RenderPlan, _clips: list[Measured], _panels: list[Measured], *, ffmpeg: str,
                  store_root: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    store = ArtifactStore(store_root)
    clips = [_must(store, s.keys["clip"])["clip.mp4"] for s in plan.shots]
    panels = [_load_png(_must(store, s.keys["storyboard"])["panel.png"]) for s in plan.shots]
    with store.writer(plan.assemble_key, {"title": plan.title}) as d:
        assemble.concat_clips(clips, d / "episode.mp4", ffmpeg=ffmpeg)
        assemble.write_srt(plan.subtitles, d / "subtitles.srt")
        assemble.write_timeline(plan.shots, plan.subtitles, d / "timeline.otio", title=plan.title,
                                fps=plan.profile.fps, media="episode.mp4")
        _save_png(storyboard.contact_sheet(panels, title=plan.title, labels=[s.shot.id for s in plan.shots]),
                  d / "storyboard.png")
    return Measured(None, [("assemble", time.perf_counter() - t0)], span=(started, time.time()))


def _must(store: ArtifactStore, key: str) -> dict[str, Path]:
    files = store.get(key)
    if files is None:
        raise FileNotFoundError(f"artifact {key[:12]} is missing or damaged in {store.root}")
    return files


# --------------------------------------------------------------------------- driver


def init_ray(address: str | None, num_cpus: int | None) -> float:
    """Connect to ``address`` or start a local cluster; returns the seconds it took."""
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True,
                     runtime_env={"py_modules": [str(Path(__file__).parent), str(Path(storyboard.__file__).parent)]})
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    return time.perf_counter() - t0


def _get(ref: Any) -> Measured:
    """``ray.get`` that surfaces a stage's own error instead of Ray's wrapped traceback.

    Nodes that finished are already in the store, so the next render resumes from them.
    """
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, AnimError):
            raise cause from None
        where = f"{getattr(exc, 'function_name', '')} {getattr(exc, 'proctitle', '')}"
        node = m.group(1) if (m := re.search(r"(\w+)_node", where)) else "render"
        raise StageError(node, None, f"{type(cause).__name__}: {cause}; finished nodes are kept in the "
                         "artifact store and will not be recomputed") from None


def render(plan: RenderPlan, *, store: ArtifactStore, prices: PriceCatalog, ffmpeg: str,
           ray_address: str | None = None, num_cpus: int | None = None,
           on_progress: Callable[[int, int, float], None] | None = None) -> RenderResult:
    """Run the plan; return the priced ledger and the assembled artifacts' paths in the store."""
    import ray

    init_s = init_ray(ray_address, num_cpus)
    t_start, started = time.perf_counter(), time.time()
    p = plan.profile
    root = str(store.root)
    sb_task = ray.remote(num_cpus=1)(storyboard_node)
    kf_task = ray.remote(num_cpus=1)(keyframes_node)
    clip_task = ray.remote(num_cpus=1)(clip_node)
    asm_task = ray.remote(num_cpus=1)(assemble_node)

    # 1. Look every node up in the store; submit only the misses, chained by ObjectRefs.
    records: list[LedgerRecord] = []
    pending: dict[Any, str] = {}  # ref -> "clip" | "other"
    clip_refs, panel_refs = [], []
    # Longest chains first, so the last node to finish is a short one and cores do not idle at the tail.
    for shot in sorted(plan.shots, key=lambda s: -sum(s.estimate_seconds.values())):
        sid = shot.shot.id
        sb_ref = None
        if store.get(shot.keys["storyboard"]) is None:
            sb_ref = sb_task.remote(shot, width=p.storyboard_width, aspect=p.aspect, store_root=root)
            pending[sb_ref] = "other"
            panel_refs.append(sb_ref)
        else:
            records.append(prices.record("storyboard", sid, 0.0, CPU, 1.0, cached=True))
        if store.get(shot.keys["clip"]) is not None:
            records += [prices.record(s, sid, 0.0, CPU, 1.0, cached=True) for s in ("keyframes", "inbetween", "encode")]
            continue
        kf_ref = None
        if store.get(shot.keys["keyframes"]) is None:
            kf_ref = kf_task.remote(shot, sb_ref, backend=p.backend, width=plan.width, height=plan.height,
                                    store_root=root)
            pending[kf_ref] = "other"
        else:
            records.append(prices.record("keyframes", sid, 0.0, CPU, 1.0, cached=True))
        ref = clip_task.remote(shot, kf_ref, interpolation=p.interpolation, flow_preset=p.flow_preset, fps=p.fps,
                               width=plan.width, height=plan.height, crf=p.crf, x264_preset=p.x264_preset,
                               ffmpeg=ffmpeg, store_root=root)
        pending[ref] = "clip"
        clip_refs.append(ref)

    # 2. Collect results as they finish; the caller shows shots done and cost so far.
    done_shots = len(plan.shots) - len(clip_refs)
    stage_seconds = 0.0

    spans: list[tuple[str, float, float]] = []

    def take(measured: Measured) -> None:
        nonlocal stage_seconds
        spans.append(("+".join(stage for stage, _ in measured.timings), *measured.span))
        for stage, seconds in measured.timings:
            records.append(prices.record(stage, measured.shot, seconds, measured.resource, measured.units))
            stage_seconds += seconds * measured.units

    if on_progress:
        on_progress(done_shots, len(plan.shots), sum(r.yuan for r in records))
    waiting = list(pending)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        take(_get(ready[0]))
        done_shots += pending[ready[0]] == "clip"
        if on_progress:
            on_progress(done_shots, len(plan.shots), sum(r.yuan for r in records))

    # 3. One assemble node joins every shot.
    if store.get(plan.assemble_key) is None:
        take(_get(asm_task.remote(plan, clip_refs, panel_refs, ffmpeg=ffmpeg, store_root=root)))
    else:
        records.append(prices.record("assemble", None, 0.0, CPU, 1.0, cached=True))
    outputs = _must(store, plan.assemble_key)
    return RenderResult(ledger=Ledger(records=records), outputs=outputs,
                        wall_seconds=time.perf_counter() - t_start, ray_init_seconds=init_s,
                        stage_seconds=stage_seconds, started=started, spans=spans)


def publish(outputs: dict[str, Path], out_dir: Path, extra: dict[str, Any]) -> dict[str, Path]:
    """Copy the episode's artifacts from the store into ``out_dir`` and write the JSON side files.

    Each file is copied under a temporary name and renamed, so ``out_dir`` never holds a
    half-written episode.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in ("storyboard.png", "subtitles.srt", "timeline.otio", "episode.mp4"):
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(outputs[name], tmp)
        tmp.replace(out_dir / name)
        written[name] = out_dir / name
    for name, data in extra.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(out_dir / name)
        written[name] = out_dir / name
    return written
