"""Node bodies: plain functions that build each stage's narrow input from the plan, run the
stage and write the artifact store.

Each returns a ``Measured``: the node, its wall seconds per ledger stage with the resource
each held, and, for clips, the quality audit. They know nothing of Ray; ``pipeline.dag`` wraps
them in remote tasks and actors. They take the store's URL, not the store, so a worker on
another machine can open the same store, and the backend's registry entry and settings, so
a backend defined anywhere (a test module too) runs without being named here. Any failure
inside a node becomes one ``NodeError`` naming the node, with the worker's traceback as text.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.models import Profile, RenderPlan, ShotPlan
from pipeline.registry import Backend, Resources
from pipeline.schedule import NodeId
from pipeline.store import Store, open_store
from stages import assemble, audit, encode, inbetween, storyboard
from stages.records import AnimError, Frame, Keyframes, NodeError

CPU = "cpu"


@dataclass(frozen=True)
class Timing:
    """Seconds one ledger stage of a node held ``units`` of ``resource``."""

    stage: str
    seconds: float
    resource: str = CPU
    units: float = 1.0


@dataclass(frozen=True)
class Measured:
    """What a node did: its timings, its output (for the next node) and its quality."""

    node: NodeId
    timings: list[Timing]
    value: Any = None
    span: tuple[float, float] = (0.0, 0.0)  # wall-clock (epoch) start and end, for utilization
    quality: dict[str, float] = field(default_factory=dict)


@contextmanager
def failing_as(node: NodeId) -> Iterator[None]:
    """Any failure inside becomes a NodeError naming ``node``, its cause's traceback kept as text
    (an exception chain does not survive the trip from a worker to the driver)."""
    try:
        yield
    except NodeError:
        raise
    except Exception as exc:
        problem = str(exc) if isinstance(exc, AnimError) else f"{type(exc).__name__}: {exc}"
        raise NodeError(str(node), problem, traceback.format_exc()) from exc


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, compress_level=3)


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def must(store: Store, key: str) -> dict[str, Path]:
    files = store.get(key)
    if files is None:
        raise FileNotFoundError(f"artifact {key[:12]} is missing or damaged in {store.url}")
    return files


def storyboard_node(shot: ShotPlan, *, entry: Backend, settings: Any, width: int, aspect: str,
                    store: str) -> Measured:
    node = NodeId("storyboard", shot.shot.id)
    t0, started = time.perf_counter(), time.time()
    with failing_as(node):
        panel = entry.build(settings, width=width, aspect=aspect)(shot.scene)
        with open_store(store).writer(shot.keys["storyboard"], {"stage": "storyboard", "shot": shot.shot.id}) as d:
            save_png(panel, d / "panel.png")
    return Measured(node, [Timing("storyboard", time.perf_counter() - t0)], span=(started, time.time()))


def draw_keyframes(drawer: Any, shots: list[ShotPlan], store: str, held: Resources = Resources(),
                   setup_s: float = 0.0) -> list[Measured]:
    """Draw the keyframes (and audit frame) of ``shots`` with one backend call, store each shot's set.

    Used by the CPU task (one shot) and by model actors (a batch of shots). A shot's
    ``keyframes`` seconds are its share of the drawing plus storing its PNGs (the node's wall
    time, as the ledger bills it); ``audit`` is its share of drawing the audit frames.
    """
    t0, started = time.perf_counter(), time.time()
    drawn = drawer([s.keyframe_request() for s in shots])
    draw_s = (time.perf_counter() - t0 + setup_s) / len(shots)
    audited = [s for s in shots if s.audit_frame is not None]
    t1 = time.perf_counter()
    truths = {s.shot.id: kf.frames[0].image
              for s, kf in zip(audited, drawer([s.audit_request() for s in audited]) if audited else [])}
    audit_s = (time.perf_counter() - t1) / max(len(audited), 1)
    out = []
    for shot, kf in zip(shots, drawn):
        t2 = time.perf_counter()
        with open_store(store).writer(shot.keys["keyframes"], {"stage": "keyframes", "shot": shot.shot.id}) as d:
            for frame in kf.frames:
                save_png(frame.image, d / f"key_{frame.index:05d}.png")
            if shot.shot.id in truths:
                save_png(truths[shot.shot.id], d / f"audit_{shot.audit_frame:05d}.png")
        timings = [Timing("keyframes", draw_s + time.perf_counter() - t2, held.resource, held.units)]
        timings += [Timing("audit", audit_s, held.resource, held.units)] if shot.shot.id in truths else []
        out.append(Measured(NodeId("keyframes", shot.shot.id), timings, value=(kf, truths.get(shot.shot.id)),
                            span=(started, time.time())))
    return out


def keyframes_node(shot: ShotPlan, _after_storyboard: Any, *, entry: Backend, settings: Any, width: int,
                   height: int, store: str) -> Measured:
    """One shot's keyframes on a worker that builds the backend for this node only (CPU backends)."""
    with failing_as(NodeId("keyframes", shot.shot.id)):
        t0 = time.perf_counter()
        drawer = entry.build(settings, width=width, height=height)
        return draw_keyframes(drawer, [shot], store, entry.resources(settings), setup_s=time.perf_counter() - t0)[0]


class KeyframeWorker:
    """A model-holding keyframe backend: loads once in ``__init__``, then draws background plates,
    character sheets and batches of keyframes (across shots) into the store. ``pipeline.dag``
    runs it as a Ray actor holding the backend's GPUs.

    A backend that cannot load (missing weights, no such device, a model that does not fit) is
    reported by ``ready()`` as a NodeError, not by an actor that dies in its constructor."""

    def __init__(self, *, entry: Backend, settings: Any, width: int, height: int, store: str):
        self.store, self.held, self.error = store, entry.resources(settings), None
        try:
            with failing_as(NodeId("keyframes", f"{entry.name} backend")):
                self.drawer = entry.build(settings, width=width, height=height)
        except NodeError as exc:
            self.error = exc

    def ready(self) -> str:
        if self.error is not None:
            raise self.error
        return self.drawer.ready() if hasattr(self.drawer, "ready") else type(self.drawer).__name__

    def _measured(self, node: NodeId, t0: float, started: float) -> Measured:
        return Measured(node, [Timing(node.stage, time.perf_counter() - t0, self.held.resource, self.held.units)],
                        span=(started, time.time()))

    def plate(self, key: str, where: list[str]) -> Measured:
        node = NodeId("plates", key)
        t0, started = time.perf_counter(), time.time()
        with failing_as(node):
            image = self.drawer.background_plate(*where)
            with open_store(self.store).writer(key, {"stage": "plate", "where": list(where)}) as d:
                save_png(image, d / "plate.png")
        return self._measured(node, t0, started)

    def sheet(self, key: str, name: str) -> Measured:
        node = NodeId("sheets", key)
        t0, started = time.perf_counter(), time.time()
        with failing_as(node):
            image = self.drawer.character_sheet(name)
            with open_store(self.store).writer(key, {"stage": "sheet", "character": name}) as d:
                save_png(image, d / "sheet.png")
        return self._measured(node, t0, started)

    def keyframes(self, shots: list[ShotPlan], plates: dict[str, list[str]], sheets: dict[str, str],
                  *_after: Any) -> Any:
        """Keyframes of ``shots`` in one backend call; one ``Measured`` per shot (a bare one for one shot,
        as Ray's ``num_returns`` expects). ``plates``: plate key -> where; ``sheets``: name -> key."""
        with failing_as(NodeId("keyframes", ", ".join(s.shot.id for s in shots))):
            st = open_store(self.store)
            plate_images = {tuple(where): load_png(must(st, key)["plate.png"]) for key, where in plates.items()}
            sheet_images = {name: load_png(must(st, key)["sheet.png"]) for name, key in sheets.items()}
            out = draw_keyframes(lambda batch: self.drawer(batch, plates=plate_images, sheets=sheet_images or None),
                                 shots, self.store, self.held)
        return out if len(out) > 1 else out[0]

    def consistency(self, shots: list[ShotPlan]) -> dict[str, float]:
        """Each character's colour consistency across every keyframe it appears in (``stages.consistency``)."""
        from stages.consistency import consistency_score
        from stages.diffusion import character_crops

        st, crops = open_store(self.store), {}
        for shot in shots:
            drawn, _ = load_keyframes(st, shot)
            for frame, t in zip(drawn.frames, shot.keyframe_times):
                for name, crop in character_crops(shot.scene, t, frame.image).items():
                    crops.setdefault(name, []).append(crop)
        return consistency_score(crops) if crops else {}


def load_keyframes(store: Store, shot: ShotPlan) -> tuple[Keyframes, np.ndarray | None]:
    files = must(store, shot.keys["keyframes"])
    frames = [Frame(int(name[4:9]), load_png(path)) for name, path in sorted(files.items())
              if name.startswith("key_")]
    truth = next((load_png(p) for n, p in files.items() if n.startswith("audit_")), None)
    return Keyframes(shot.shot.id, frames), truth


class _Watch:
    """Wraps the in-between stream: times it, keeps the audited frame, measures flicker."""

    def __init__(self, frames: Iterator[np.ndarray], audit_frame: int | None):
        self.frames, self.audit_frame = frames, audit_frame
        self.seconds, self.audited, self.flicker = 0.0, None, audit.FlickerMeter()

    def __iter__(self) -> Iterator[np.ndarray]:
        index = 0
        while True:
            t0 = time.perf_counter()
            try:
                frame = next(self.frames)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.flicker.add(frame)
            if index == self.audit_frame:
                self.audited = frame
            self.seconds += time.perf_counter() - t0
            index += 1
            yield frame


def clip_node(shot: ShotPlan, kf: Measured | None, *, entry: Backend, settings: Any, profile: Profile,
              width: int, height: int, ffmpeg: str, store: str) -> Measured:
    """In-betweens streamed into the encoder; the audit frame compared on the way."""
    node = NodeId("clip", shot.shot.id)
    t0, started = time.perf_counter(), time.time()
    with failing_as(node):
        st = open_store(store)
        drawn, truth = kf.value if kf is not None else load_keyframes(st, shot)
        method = entry.build(settings, width=width, height=height)
        watch = _Watch(inbetween.shot_frames(drawn, frames=shot.frames, drawings=shot.drawings, interpolate=method),
                       shot.audit_frame if truth is not None else None)
        quality: dict[str, float] = {}
        audit_s = 0.0
        with st.writer(shot.keys["clip"], {"stage": "clip", "shot": shot.shot.id}) as d:
            encode.encode_clip(watch, d / "clip.mp4", width=width, height=height, fps=profile.fps, crf=profile.crf,
                               preset=profile.x264_preset, threads=1, ffmpeg=ffmpeg, shot=shot.shot.id)
            t1 = time.perf_counter()
            if truth is not None and watch.audited is not None:
                fid = audit.fidelity(shot.audit_frame, truth, watch.audited)
                quality = {"audit_psnr_db": fid.psnr_db, "audit_ssim": fid.ssim}
                audit_s = time.perf_counter() - t1
            quality["flicker"] = watch.flicker.value
            (d / "quality.json").write_text(json.dumps(quality))
    # The node's wall time: in-betweening as streamed (on the in-betweener's resources), the
    # audit comparison, and the rest — encoding and storing the clip — billed to encode.
    held = entry.resources(settings)
    total = time.perf_counter() - t0
    timings = [Timing("inbetween", watch.seconds, held.resource, held.units),
               Timing("encode", total - watch.seconds - audit_s)]
    timings += [Timing("audit", audit_s)] if "audit_psnr_db" in quality else []
    return Measured(node, timings, span=(started, time.time()), quality=quality)


def _contact_sheet(plan: RenderPlan, st: Store) -> np.ndarray:
    panels = [load_png(must(st, s.keys["storyboard"])["panel.png"]) for s in plan.shots]
    return storyboard.contact_sheet(panels, title=plan.title, labels=[s.shot.id for s in plan.shots])


def contact_sheet_node(plan: RenderPlan, *, store: str) -> Measured:
    """The storyboard contact sheet alone (for ``--stop-after storyboard`` and partial renders)."""
    node = NodeId("contact_sheet")
    t0, started = time.perf_counter(), time.time()
    with failing_as(node):
        st = open_store(store)
        with st.writer(plan.contact_sheet_key, {"stage": "sheet", "title": plan.title}) as d:
            save_png(_contact_sheet(plan, st), d / "storyboard.png")
    return Measured(node, [Timing("storyboard", time.perf_counter() - t0)], span=(started, time.time()))


def timeline_clips(plan: RenderPlan) -> list[assemble.TimelineClip]:
    """What the editorial timeline shows of each shot."""
    return [assemble.TimelineClip(id=s.shot.id, start_frame=s.start_frame, frames=s.frames,
                                  camera=s.shot.camera.value, scene=s.scene.heading, action=s.shot.action,
                                  characters=list(s.shot.characters), keyframes=len(s.keyframes),
                                  content_key=s.keys["clip"]) for s in plan.shots]


def assemble_node(plan: RenderPlan, *, ffmpeg: str, store: str) -> Measured:
    node = NodeId("assemble")
    t0, started = time.perf_counter(), time.time()
    with failing_as(node):
        st = open_store(store)
        clips = [must(st, s.keys["clip"])["clip.mp4"] for s in plan.shots]
        with st.writer(plan.assemble_key, {"stage": "assemble", "title": plan.title}) as d:
            assemble.concat_clips(clips, d / "episode.mp4", ffmpeg=ffmpeg)
            assemble.write_srt(plan.subtitles, d / "subtitles.srt")
            assemble.write_timeline(timeline_clips(plan), plan.subtitles, d / "timeline.otio", title=plan.title,
                                    fps=plan.profile.fps, media="episode.mp4")
            save_png(_contact_sheet(plan, st), d / "storyboard.png")
    return Measured(node, [Timing("assemble", time.perf_counter() - t0)], span=(started, time.time()))
