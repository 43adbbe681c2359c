"""Node bodies: plain functions that run stages and write the artifact store.

Each returns a ``Measured``: the wall seconds per stage, the resources held and, for clips,
the quality audit. They know nothing of Ray; ``pipeline.dag`` wraps them in remote tasks
and actors. They take the store's URL, not the store, so a worker on another machine can
open the same store.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.cache import ArtifactStore
from stages.records import Frame, Keyframes
from pipeline.models import Profile, RenderPlan, ShotPlan
from stages import assemble, audit, encode, inbetween, keyframes, storyboard

CPU = "cpu"

# What each in-betweener takes from the profile. A new one adds a line here and a class in
# stages/inbetween.py.
INTERPOLATOR_ARGS = {
    "flow": lambda p: {"preset": p.flow_preset},
    "crossfade": lambda p: {},
    "rife": lambda p: {"weights": p.rife_weights},
}


@dataclass(frozen=True)
class Measured:
    """What a node did: (stage, seconds) on ``units`` of ``resource``, its output and its quality."""

    shot: str | None
    timings: list[tuple[str, float]]
    resource: str = CPU
    units: float = 1.0
    value: Any = None
    span: tuple[float, float] = (0.0, 0.0)  # wall-clock (epoch) start and end, for utilization
    quality: dict[str, float] = field(default_factory=dict)


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, compress_level=3)


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def must(store: ArtifactStore, key: str) -> dict[str, Path]:
    files = store.get(key)
    if files is None:
        raise FileNotFoundError(f"artifact {key[:12]} is missing or damaged in {store.url}")
    return files


def storyboard_node(shot: ShotPlan, *, width: int, aspect: str, store: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    panel = storyboard.render_panel(shot, width=width, aspect=aspect)
    with ArtifactStore(store).writer(shot.keys["storyboard"], {"stage": "storyboard", "shot": shot.shot.id}) as d:
        save_png(panel, d / "panel.png")
    return Measured(shot.shot.id, [("storyboard", time.perf_counter() - t0)], span=(started, time.time()))


def draw_keyframes(drawer: Any, shots: list[ShotPlan], store: str, resource: str = CPU,
                   units: float = 1.0, setup_s: float = 0.0) -> list[Measured]:
    """Draw the keyframes (and audit frame) of ``shots`` with one backend call, store each shot's set.

    Used by the CPU task (one shot) and by model actors (a batch of shots). A shot's
    ``keyframes`` seconds are its share of the drawing plus storing its PNGs (the node's wall
    time, as the ledger bills it); ``audit`` is its share of drawing the audit frames.
    """
    t0, started = time.perf_counter(), time.time()
    drawn = drawer(shots)
    draw_s = (time.perf_counter() - t0 + setup_s) / len(shots)
    audits = [s.model_copy(update={"keyframes": [s.audit_frame]}) for s in shots if s.audit_frame is not None]
    t1 = time.perf_counter()
    truths = {a.shot.id: kf.frames[0].image for a, kf in zip(audits, drawer(audits) if audits else [])}
    audit_s = (time.perf_counter() - t1) / max(len(audits), 1)
    out = []
    for shot, kf in zip(shots, drawn):
        t2 = time.perf_counter()
        with ArtifactStore(store).writer(shot.keys["keyframes"], {"stage": "keyframes", "shot": shot.shot.id}) as d:
            for frame in kf.frames:
                save_png(frame.image, d / f"key_{frame.index:05d}.png")
            if shot.shot.id in truths:
                save_png(truths[shot.shot.id], d / f"audit_{shot.audit_frame:05d}.png")
        timings = [("keyframes", draw_s + time.perf_counter() - t2)]
        timings += [("audit", audit_s)] if shot.shot.id in truths else []
        out.append(Measured(shot.shot.id, timings, resource, units, value=(kf, truths.get(shot.shot.id)),
                            span=(started, time.time())))
    return out


def keyframes_node(shot: ShotPlan, _after_storyboard: Any, *, backend: str, width: int, height: int,
                   store: str) -> Measured:
    t0 = time.perf_counter()
    drawer = keyframes.backend(backend, width=width, height=height)
    return draw_keyframes(drawer, [shot], store, setup_s=time.perf_counter() - t0)[0]


class KeyframeWorker:
    """A model-holding keyframe backend: loads once in ``__init__``, then draws background plates,
    character sheets and batches of keyframes (across shots) into the store. ``pipeline.dag``
    runs it as a Ray actor holding ``num_gpus``."""

    def __init__(self, *, backend: str, width: int, height: int, settings: Any, store: str,
                 resource: str, units: float):
        self.drawer = keyframes.backend(backend, width=width, height=height, settings=settings)
        self.store, self.resource, self.units = store, resource, units

    def ready(self) -> str:
        return self.drawer.ready() if hasattr(self.drawer, "ready") else type(self.drawer).__name__

    def _measured(self, stage: str, t0: float, started: float, shot: str | None = None) -> Measured:
        return Measured(shot, [(stage, time.perf_counter() - t0)], self.resource, self.units,
                        span=(started, time.time()))

    def plate(self, key: str, where: tuple[str, str, str]) -> Measured:
        t0, started = time.perf_counter(), time.time()
        image = self.drawer.background_plate(*where)
        with ArtifactStore(self.store).writer(key, {"stage": "plate", "where": list(where)}) as d:
            save_png(image, d / "plate.png")
        return self._measured("plates", t0, started)

    def sheet(self, key: str, name: str) -> Measured:
        t0, started = time.perf_counter(), time.time()
        image = self.drawer.character_sheet(name)
        with ArtifactStore(self.store).writer(key, {"stage": "sheet", "character": name}) as d:
            save_png(image, d / "sheet.png")
        return self._measured("sheets", t0, started)

    def keyframes(self, shots: list[ShotPlan], plates: dict[tuple[str, str, str], str], sheets: dict[str, str],
                  *_after: Any) -> Any:
        """Keyframes of ``shots`` in one backend call; one ``Measured`` per shot (a bare one for one shot,
        as Ray's ``num_returns`` expects)."""
        st = ArtifactStore(self.store)
        plate_images = {where: load_png(must(st, key)["plate.png"]) for where, key in plates.items()}
        sheet_images = {name: load_png(must(st, key)["sheet.png"]) for name, key in sheets.items()}
        out = draw_keyframes(lambda batch: self.drawer(batch, plates=plate_images, sheets=sheet_images or None),
                             shots, self.store, self.resource, self.units)
        return out if len(out) > 1 else out[0]

    def consistency(self, shots: list[ShotPlan]) -> dict[str, float]:
        """Each character's colour consistency across every keyframe it appears in (``stages.consistency``)."""
        from stages.consistency import consistency_score
        from stages.diffusion import character_crops

        st, crops = ArtifactStore(self.store), {}
        for shot in shots:
            drawn, _ = load_keyframes(st, shot)
            for frame, t in zip(drawn.frames, shot.keyframe_times):
                for name, crop in character_crops(shot, t, frame.image).items():
                    crops.setdefault(name, []).append(crop)
        return consistency_score(crops) if crops else {}


def load_keyframes(store: ArtifactStore, shot: ShotPlan) -> tuple[Keyframes, np.ndarray | None]:
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


def clip_node(shot: ShotPlan, kf: Measured | None, *, profile: Profile, width: int, height: int, ffmpeg: str,
              store: str) -> Measured:
    """In-betweens streamed into the encoder; the audit frame compared on the way."""
    t0, started = time.perf_counter(), time.time()
    st = ArtifactStore(store)
    drawn, truth = kf.value if kf is not None else load_keyframes(st, shot)
    method = inbetween.interpolator(profile.interpolation, **INTERPOLATOR_ARGS[profile.interpolation](profile))
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
    # The node's wall time: in-betweening as streamed, the audit comparison, and the rest —
    # encoding and storing the clip — billed to encode.
    total = time.perf_counter() - t0
    timings = [("inbetween", watch.seconds), ("encode", total - watch.seconds - audit_s)]
    timings += [("audit", audit_s)] if "audit_psnr_db" in quality else []
    return Measured(shot.shot.id, timings, span=(started, time.time()), quality=quality)


def sheet_node(plan: RenderPlan, *, key: str, store: str) -> Measured:
    """The storyboard contact sheet alone (for ``--stop-after storyboard`` and partial renders)."""
    t0, started = time.perf_counter(), time.time()
    st = ArtifactStore(store)
    panels = [load_png(must(st, s.keys["storyboard"])["panel.png"]) for s in plan.shots]
    with st.writer(key, {"stage": "sheet", "title": plan.title}) as d:
        save_png(storyboard.contact_sheet(panels, title=plan.title, labels=[s.shot.id for s in plan.shots]),
                 d / "storyboard.png")
    return Measured(None, [("storyboard", time.perf_counter() - t0)], span=(started, time.time()))


def assemble_node(plan: RenderPlan, *, ffmpeg: str, store: str) -> Measured:
    t0, started = time.perf_counter(), time.time()
    st = ArtifactStore(store)
    clips = [must(st, s.keys["clip"])["clip.mp4"] for s in plan.shots]
    panels = [load_png(must(st, s.keys["storyboard"])["panel.png"]) for s in plan.shots]
    with st.writer(plan.assemble_key, {"stage": "assemble", "title": plan.title}) as d:
        assemble.concat_clips(clips, d / "episode.mp4", ffmpeg=ffmpeg)
        assemble.write_srt(plan.subtitles, d / "subtitles.srt")
        assemble.write_timeline(plan.shots, plan.subtitles, d / "timeline.otio", title=plan.title,
                                fps=plan.profile.fps, media="episode.mp4")
        save_png(storyboard.contact_sheet(panels, title=plan.title, labels=[s.shot.id for s in plan.shots]),
                 d / "storyboard.png")
    return Measured(None, [("assemble", time.perf_counter() - t0)], span=(started, time.time()))
