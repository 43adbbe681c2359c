"""Node bodies: plain functions that build each stage's narrow input from the plan, run the
stage and write the artifact store.

Each returns a ``Measured``: the node, its wall seconds per ledger stage with the resource
each held (and those timings priced: its ledger rows), and, for clips, the quality audit.
They know nothing of Ray; ``pipeline.dag`` wraps them in remote tasks and actors. They take a
``Work`` (the store's URL, this render's id, the price catalog), not the store, so a worker on
another machine can open the same store, and the backend's registry entry and settings, so
a backend defined anywhere (a test module too) runs without being named here. Any failure
inside a node becomes one ``NodeError`` naming the node, with the worker's traceback as text.

Every node claims its content key first (``Claim``): if the artifact is in the store it is
a hit; if another render holds the key's lease it waits for that artifact and takes it as a
hit (``Measured.taken``: ¥0 to this render, the other render paid); else it holds the lease
(renewed by a heartbeat) while it computes. Its priced rows are written to the store as its
spend note (``pipeline.ledger``) just before its artifact commits, so a render killed before
it publishes has its finished nodes' spend on record. A node's time starts when it holds the
lease (waiting for another render is not billed) and ends at that note: the commit itself —
checksumming the files, a rename or an upload — is not billed.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.ledger import WAIT_POLL_S, Claim, Timing, Work, claimed
from pipeline.models import LedgerRecord, Profile, RenderPlan, ShotPlan, VoicePlan
from pipeline.registry import Backend, Resources
from pipeline.schedule import NodeId
from pipeline.store import LeaseInfo, Store, open_store
from stages import assemble, audit, encode, handoffs, inbetween, mix, storyboard, subtitles, transitions
from stages.records import AnimError, AudioStem, Frame, Keyframes, NodeError, StageError, TransientNodeError



@dataclass(frozen=True)
class Measured:
    """What a node did: its timings and their priced rows, its output (for the next node) and its
    quality. ``taken``: another render made the artifact meanwhile (a hit, no rows)."""

    node: NodeId
    timings: list[Timing]
    rows: list[LedgerRecord] = field(default_factory=list)
    value: Any = None
    span: tuple[float, float] = (0.0, 0.0)  # wall-clock (epoch) start and end, for utilization
    quality: dict[str, float] = field(default_factory=dict)
    taken: bool = False


def measured(claim: Claim, value: Any = None, quality: dict[str, float] | None = None) -> Measured:
    """What a claimed node did; a node another render made is ``taken``, with no rows."""
    if claim.taken:
        return Measured(claim.node, [], span=(claim.started, claim.started), taken=True)
    return Measured(claim.node, claim.timings, claim.rows, value, span=(claim.started, time.time()),
                    quality=quality or {})


@contextmanager
def failing_as(node: NodeId) -> Iterator[None]:
    """Any failure inside becomes a NodeError naming ``node``, its cause's traceback kept as text
    (an exception chain does not survive the trip from a worker to the driver); a ``transient``
    one a TransientNodeError, which the executor retries."""
    try:
        yield
    except NodeError:
        raise
    except Exception as exc:
        problem = str(exc) if isinstance(exc, AnimError) else f"{type(exc).__name__}: {exc}"
        kind = TransientNodeError if transient(exc) else NodeError
        raise kind(str(node), problem, traceback.format_exc()) from exc


# OSErrors that say something about the input or the setup, not about a passing moment: running
# the node again would fail the same way.
_LASTING_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient(exc: BaseException) -> bool:
    """A failure that says nothing about the node's input, so the node may be run again: a stage
    error marked transient (an encoder killed by a signal) or an OSError from the store that is not
    proven-bad content (a missing or damaged artifact, a permission) — never a project error about
    the input, nor a programming error."""
    if isinstance(exc, StageError):
        return exc.transient
    return isinstance(exc, OSError) and not isinstance(exc, _LASTING_OS_ERRORS)


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
                    work: Work) -> Measured:
    node, key = NodeId("storyboard", shot.shot.id), shot.keys["storyboard"]
    with failing_as(node), claimed(work, node, key) as claim:
        if claim.taken:
            return measured(claim)
        panel = entry.build(settings, width=width, aspect=aspect)(shot.scene)
        with claim.store.writer(key, {"stage": "storyboard", "shot": shot.shot.id}) as d:
            save_png(panel, d / "panel.png")
            claim.spend([Timing("storyboard", claim.elapsed())])
    return measured(claim)


def draw_keyframes(drawer: Any, claims: list[tuple[ShotPlan, Claim]], held: Resources = Resources(),
                   setup_s: float = 0.0) -> list[Measured]:
    """Draw the keyframes (and audit frame) of the claimed shots with one backend call, store each
    shot's set with its spend.

    Used by the CPU task (one shot) and by model actors (a batch of shots). A shot's
    ``keyframes`` seconds are its share of the drawing plus storing its PNGs (the node's wall
    time, as the ledger bills it); ``audit`` is its share of drawing the audit frames.
    """
    shots = [s for s, _ in claims]
    t0 = time.perf_counter()
    drawn = drawer([s.keyframe_request() for s in shots])
    draw_s = (time.perf_counter() - t0 + setup_s) / len(shots)
    audited = [s for s in shots if s.audit_frame is not None]
    t1 = time.perf_counter()
    truths = {s.shot.id: kf.frames[0].image
              for s, kf in zip(audited, drawer([s.audit_request() for s in audited]) if audited else [])}
    audit_s = (time.perf_counter() - t1) / max(len(audited), 1)
    out = []
    for (shot, claim), kf in zip(claims, drawn):
        t2 = time.perf_counter()
        with claim.store.writer(shot.keys["keyframes"], {"stage": "keyframes", "shot": shot.shot.id}) as d:
            for frame in kf.frames:
                save_png(frame.image, d / f"key_{frame.index:05d}.png")
            if shot.shot.id in truths:
                save_png(truths[shot.shot.id], d / f"audit_{shot.audit_frame:05d}.png")
            timings = [Timing("keyframes", draw_s + time.perf_counter() - t2, held.resource, held.units)]
            timings += [Timing("audit", audit_s, held.resource, held.units)] if shot.shot.id in truths else []
            claim.spend(timings)
        claim.release()
        out.append(measured(claim, value=(kf, truths.get(shot.shot.id))))
    return out


def keyframes_batch(work: Work, shots: list[ShotPlan], held: Resources,
                    draw: Callable[[list[Any]], list[Keyframes]], build_s: float = 0.0) -> list[Measured]:
    """Claim each shot's keyframes; draw the claimed ones in one call; then wait for those another
    render holds (taken when it is done, or drawn here if its holder gave the key up)."""
    st = open_store(work.store)
    done: dict[str, Measured] = {}
    pending, deadline = list(shots), time.monotonic() + work.wait_s
    while pending:
        mine, waiting = [], []
        try:
            for shot in pending:
                claim = Claim(work, st, NodeId("keyframes", shot.shot.id), shot.keys["keyframes"], held,
                              share=1 / len(pending))
                got = claim.take()
                if got is None:
                    done[shot.shot.id] = measured(claim)
                elif isinstance(got, LeaseInfo):
                    waiting.append(shot)
                else:
                    mine.append((shot, claim))
        except BaseException:  # a shot told to stop: the leases already taken go back
            for _, claim in mine:
                claim.release()
            raise
        try:
            if mine:
                for m in draw_keyframes(draw, mine, held, setup_s=build_s):
                    done[m.node.item] = m
                build_s = 0.0
        except Exception:
            for _, claim in mine:
                claim.failed()
            raise
        finally:
            for _, claim in mine:
                claim.release()
        pending = waiting
        if pending:
            if time.monotonic() > deadline:
                raise AnimError(f"waited {work.wait_s:.0f} s for another render's keyframes of "
                                f"{', '.join(s.shot.id for s in pending)}; nothing more was computed")
            time.sleep(WAIT_POLL_S)
    return [done[s.shot.id] for s in shots]


def keyframes_node(shot: ShotPlan, _after_storyboard: Any, *, entry: Backend, settings: Any, width: int,
                   height: int, work: Work) -> Measured:
    """One shot's keyframes on a worker that builds the backend for this node only (CPU backends)."""
    node, held = NodeId("keyframes", shot.shot.id), entry.resources(settings)
    with failing_as(node), claimed(work, node, shot.keys["keyframes"], held) as claim:
        if claim.taken:
            return measured(claim)
        drawer = entry.build(settings, width=width, height=height)
        return draw_keyframes(drawer, [(shot, claim)], held, setup_s=claim.elapsed())[0]


class KeyframeWorker:
    """A model-holding keyframe backend: loads once in ``__init__``, then draws background plates,
    character sheets and batches of keyframes (across shots) into the store. ``pipeline.dag``
    runs it as a Ray actor holding the backend's GPUs.

    A backend that cannot load (missing weights, no such device, a model that does not fit) is
    reported by ``ready()`` as a NodeError, not by an actor that dies in its constructor.

    It measures what a cloud bills before the first keyframe: when its process began building
    (``created``, epoch), how long the model took to build (``load_s``) and, for a backend with a
    ``warmup()`` step, that step (``warmup_s``); ``startup()`` reports them to the executor, which
    bills them as ``model_load`` / ``warmup`` rows (``pipeline.cost.billed_view``), never to a shot."""

    def __init__(self, *, entry: Backend, settings: Any, width: int, height: int, work: Work):
        self.work, self.held, self.error = work, entry.resources(settings), None
        self.created, self.warmup_s = time.time(), None
        t0 = time.perf_counter()
        try:
            with failing_as(NodeId("keyframes", f"{entry.name} backend")):
                self.drawer = entry.build(settings, width=width, height=height)
        except NodeError as exc:
            self.error = exc
        self.load_s = time.perf_counter() - t0

    def ready(self) -> str:
        """Loaded and warmed up (once): what this worker runs on, or the NodeError that stopped it."""
        if self.error is not None:
            raise self.error
        if self.warmup_s is None:
            t0 = time.perf_counter()
            if hasattr(self.drawer, "warmup"):
                with failing_as(NodeId("keyframes", "warm-up")):
                    self.drawer.warmup()
            self.warmup_s = time.perf_counter() - t0 if hasattr(self.drawer, "warmup") else 0.0
        return self.drawer.ready() if hasattr(self.drawer, "ready") else type(self.drawer).__name__

    def startup(self) -> dict[str, Any]:
        """``ready()``, with what starting cost: ``created`` (epoch), ``load_s``, ``warmup_s``, ``ready``."""
        what = self.ready()
        return {"created": self.created, "load_s": self.load_s, "warmup_s": self.warmup_s, "ready": what}

    def _drawn(self, node: NodeId, key: str, meta: dict, name: str, draw: Callable[[], np.ndarray]) -> Measured:
        with failing_as(node), claimed(self.work, node, key, self.held) as claim:
            if claim.taken:
                return measured(claim)
            image = draw()
            with claim.store.writer(key, meta) as d:
                save_png(image, d / name)
                claim.spend([Timing(node.stage, claim.elapsed(), self.held.resource, self.held.units)])
        return measured(claim)

    def plate(self, key: str, where: list[str]) -> Measured:
        return self._drawn(NodeId("plates", key), key, {"stage": "plate", "where": list(where)}, "plate.png",
                           lambda: self.drawer.background_plate(*where))

    def sheet(self, key: str, name: str) -> Measured:
        return self._drawn(NodeId("sheets", key), key, {"stage": "sheet", "character": name}, "sheet.png",
                           lambda: self.drawer.character_sheet(name))

    def keyframes(self, shots: list[ShotPlan], plates: dict[str, list[str]], sheets: dict[str, str],
                  *_after: Any) -> Any:
        """Keyframes of ``shots`` in one backend call; one ``Measured`` per shot (a bare one for one shot,
        as Ray's ``num_returns`` expects). ``plates``: plate key -> where; ``sheets``: name -> key."""
        with failing_as(NodeId("keyframes", ", ".join(s.shot.id for s in shots))):
            st = open_store(self.work.store)
            plate_images = {tuple(where): load_png(must(st, key)["plate.png"]) for key, where in plates.items()}
            sheet_images = {name: load_png(must(st, key)["sheet.png"]) for name, key in sheets.items()}
            out = keyframes_batch(self.work, shots, self.held,
                                  lambda batch: self.drawer(batch, plates=plate_images, sheets=sheet_images or None))
        return out if len(out) > 1 else out[0]

    def consistency(self, shots: list[ShotPlan]) -> dict[str, float]:
        """Each character's colour consistency across every keyframe it appears in (``stages.consistency``)."""
        from stages.consistency import consistency_score
        from stages.diffusion import character_crops

        st, crops = open_store(self.work.store), {}
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
              width: int, height: int, ffmpeg: str, work: Work) -> Measured:
    """In-betweens streamed into the encoder; the audit frame compared on the way."""
    node, key, held = NodeId("clip", shot.shot.id), shot.keys["clip"], entry.resources(settings)
    with failing_as(node), claimed(work, node, key, held) as claim:
        if claim.taken:
            return measured(claim)
        st = claim.store
        # The keyframes as their node returned them, or from the store (cached, or another render's).
        drawn, truth = kf.value if kf is not None and kf.value is not None else load_keyframes(st, shot)
        method = entry.build(settings, width=width, height=height)
        watch = _Watch(inbetween.shot_frames(drawn, frames=shot.frames, drawings=shot.drawings, interpolate=method),
                       shot.audit_frame if truth is not None else None)
        quality: dict[str, float] = {}
        audit_s = 0.0
        with st.writer(key, {"stage": "clip", "shot": shot.shot.id}) as d:
            fades = transitions.fade_levels(shot.shot, shot.frames, profile.fps)  # after the audit's frame
            encode.encode_clip(transitions.faded(watch, fades), d / "clip.mp4", width=width, height=height,
                               fps=profile.fps, crf=profile.crf, preset=profile.x264_preset, threads=1, ffmpeg=ffmpeg,
                               shot=shot.shot.id)
            t1 = time.perf_counter()
            if truth is not None and watch.audited is not None:
                fid = audit.fidelity(shot.audit_frame, truth, watch.audited)
                quality = {"audit_psnr_db": fid.psnr_db, "audit_ssim": fid.ssim}
                audit_s = time.perf_counter() - t1
            quality["flicker"] = watch.flicker.value
            quality.update({f"route_{r}": float(n) for r, n in (getattr(method, "routes", None) or {}).items()})
            (d / "quality.json").write_text(json.dumps(quality))
            # The node's wall time: in-betweening as streamed (on the in-betweener's resources), the
            # audit comparison, and the rest — encoding and writing the clip — billed to encode.
            total = claim.elapsed()
            timings = inbetween_timings(method, watch.seconds, held) + [Timing("encode", total - watch.seconds - audit_s)]
            timings += [Timing("audit", audit_s)] if "audit_psnr_db" in quality else []
            claim.spend(timings)
    return measured(claim, quality=quality)


def inbetween_timings(method: Any, seconds: float, held: Resources) -> list[Timing]:
    """The clip's in-betweening rows: one, or for an in-betweener that routes each pair to a method
    (``routes`` pairs and ``seconds`` per route: the adaptive one) one row per method it used, each
    its own seconds, the rest of the stream (holds, drawing repeats) billed to the first."""
    spent, routes = getattr(method, "seconds", None), getattr(method, "routes", None)
    used = {m: s for m, s in spent.items() if s > 0 or routes.get(m)} if isinstance(spent, dict) and routes else {}
    if not used:
        return [Timing("inbetween", seconds, held.resource, held.units)]
    rest = max(seconds - sum(used.values()), 0.0)
    first = next(iter(used))
    return [Timing("inbetween", s + (rest if m == first else 0.0), held.resource, held.units, method=m)
            for m, s in used.items()]


def _contact_sheet(plan: RenderPlan, st: Store) -> np.ndarray:
    panels = [load_png(must(st, s.keys["storyboard"])["panel.png"]) for s in plan.shots]
    return storyboard.contact_sheet(panels, title=plan.title, labels=[s.shot.id for s in plan.shots])


def contact_sheet_node(plan: RenderPlan, *, work: Work) -> Measured:
    """The storyboard contact sheet alone (for ``--stop-after storyboard`` and partial renders)."""
    node, key = NodeId("contact_sheet"), plan.contact_sheet_key
    with failing_as(node), claimed(work, node, key) as claim:
        if claim.taken:
            return measured(claim)
        with claim.store.writer(key, {"stage": "sheet", "title": plan.title}) as d:
            save_png(_contact_sheet(plan, claim.store), d / "storyboard.png")
            claim.spend([Timing("storyboard", claim.elapsed())])
    return measured(claim)


def timeline_clips(plan: RenderPlan) -> list[handoffs.TimelineClip]:
    """What the editorial timeline shows of each shot; its media is its own clip, ``shot-<id>.mp4``."""
    return [handoffs.TimelineClip(id=s.shot.id, start_frame=s.start_frame, frames=s.frames,
                                  camera=s.shot.camera.value, scene=s.scene.heading, action=s.shot.action,
                                  characters=list(s.shot.characters), keyframes=len(s.keyframes),
                                  content_key=s.keys["clip"], media=f"shot-{s.shot.id}.mp4",
                                  transition_out=s.shot.transition_out) for s in plan.shots]


def write_handoffs(plan: RenderPlan, clips: list[Path], d: Path, stems: list[AudioStem]) -> None:
    """Every shot's own clip beside the episode (``shot-<id>.mp4``, published with it) and the
    editorial hand-offs that point at them: ``timeline.otio``, ``timeline.xml`` (FCP 7) and
    ``jianying_draft.zip`` (剪映). ``stems``: the audio stems in ``d`` (dialogue, music)."""
    shots = timeline_clips(plan)
    for shot, clip in zip(shots, clips):
        shutil.copyfile(clip, d / shot.media)
    fps = plan.profile.fps
    handoffs.write_timeline(shots, plan.subtitles, d / "timeline.otio", title=plan.title, fps=fps, stems=stems)
    handoffs.write_fcp_xml(shots, plan.subtitles, d / "timeline.xml", title=plan.title, fps=fps, stems=stems)
    handoffs.write_jianying_draft(shots, plan.subtitles, d / "jianying_draft.zip", media_dir=d, title=plan.title,
                                  width=plan.width, height=plan.height, fps=fps, stems=stems)


def voice_node(lines: list[VoicePlan], *, entry: Backend, settings: Any, work: Work, speaker: Any = None) -> Any:
    """Every line's voice into the store (``line.wav`` and its measured ``speech.json``), one line
    at a time, each under its own key and lease; the backend (unless a model actor passes its
    ``speaker``) is built once, when the first line this render must speak is claimed (its build
    billed to that line). One ``Measured`` per line (a bare one for one line, as Ray's
    ``num_returns`` expects)."""
    held = entry.resources(settings)
    out: list[Measured] = []
    for v in lines:
        node = NodeId("voice", v.id)
        with failing_as(node), claimed(work, node, v.key, held) as claim:
            if claim.taken:
                out.append(measured(claim))
                continue
            if speaker is None:  # built inside the first claim: its time is in that line's elapsed
                speaker = entry.build(settings)
            with claim.store.writer(v.key, {"stage": "voice", "line": v.id, "character": v.line.character}) as d:
                speech = speaker(v.line, d / "line.wav")
                (d / "speech.json").write_text(speech.model_dump_json())
                claim.spend([Timing("voice", claim.elapsed(), held.resource, held.units)])
        out.append(measured(claim))
    return out if len(out) > 1 else out[0]


class VoiceWorker:
    """A model-holding voice backend (a neural TTS on a GPU): loads once in ``__init__``, then speaks
    batches of lines into the store. ``pipeline.dag`` runs it as a Ray actor holding the backend's
    GPUs; like ``KeyframeWorker`` it reports a backend that cannot load from ``startup()`` as a
    NodeError (one line naming the path), and what its start cost (``created``, ``load_s``)."""

    def __init__(self, *, entry: Backend, settings: Any, work: Work):
        self.entry, self.settings, self.work, self.error, self.speaker = entry, settings, work, None, None
        self.created = time.time()
        t0 = time.perf_counter()
        try:
            with failing_as(NodeId("voice", f"{entry.name} backend")):
                self.speaker = entry.build(settings)
        except NodeError as exc:
            self.error = exc
        self.load_s = time.perf_counter() - t0

    def startup(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        what = self.speaker.ready() if hasattr(self.speaker, "ready") else type(self.speaker).__name__
        return {"created": self.created, "load_s": self.load_s, "warmup_s": 0.0, "ready": what}

    def speak(self, lines: list[VoicePlan]) -> Any:
        return voice_node(lines, entry=self.entry, settings=self.settings, work=self.work, speaker=self.speaker)


def _language(plan: RenderPlan) -> str:
    """ISO 639-2 tag of the soft subtitle track: Chinese when the cues are, else English."""
    return "chi" if any(subtitles.cjk(c.text) for c in plan.subtitles) else "eng"


def assemble_node(plan: RenderPlan, *, ffmpeg: str, work: Work) -> Measured:
    """The episode: the clips joined, the mix (stems kept), the master with AAC and a soft
    subtitle track, the ASS file and the burned-in delivery variant, the hand-offs."""
    node, key = NodeId("assemble"), plan.assemble_key
    with failing_as(node), claimed(work, node, key) as claim:
        if claim.taken:
            return measured(claim)
        st = claim.store
        p = plan.profile
        clips = [must(st, s.keys["clip"])["clip.mp4"] for s in plan.shots]
        with st.writer(key, {"stage": "assemble", "title": plan.title}) as d:
            # 1. The mix: every line at its place, the bed under it, to the delivery loudness.
            t0 = time.perf_counter()
            lines = [mix.Placement(str(must(st, v.key)["line.wav"]), v.start_s) for v in plan.voices]
            sound = mix.mix(lines, plan.duration_s, d, ffmpeg=ffmpeg, target_lufs=p.loudness_lufs,
                            bed=plan.bed.path if plan.bed else None, bed_db=p.music_db, duck_db=p.duck_db)
            mix_s = time.perf_counter() - t0
            # 2. Picture (the written dissolves blended on their cuts, as the hand-offs time them), sound
            #    and the soft subtitle track in the master.
            cuts = handoffs.cut_dissolves([s.frames for s in plan.shots], [s.shot.transition_out for s in plan.shots],
                                          p.fps)
            dissolves = [assemble.Dissolve(k, n) for k, n in cuts.items()]
            assemble.concat_clips(clips, d / "picture.mp4", ffmpeg=ffmpeg, dissolves=dissolves, fps=p.fps,
                                  codec=encode.codec_args(fps=p.fps, crf=p.crf, preset=p.x264_preset))
            assemble.write_srt(plan.subtitles, d / "subtitles.srt")
            assemble.mux(d / "picture.mp4", d / "mix.m4a", d / "subtitles.srt" if plan.subtitles else None,
                         d / "episode.mp4", ffmpeg=ffmpeg, language=_language(plan))
            (d / "picture.mp4").unlink()
            stems = [AudioStem(name="dialogue", path="dialogue.wav", duration_s=sound.duration_s,
                               loudness_lufs=sound.dialogue_lufs)]
            if plan.bed:
                stems.append(AudioStem(name="music", path="music.wav", duration_s=sound.duration_s,
                                       loudness_lufs=sound.bed_lufs))
            stems.append(AudioStem(name="mix", path="mix.m4a", duration_s=sound.duration_s,
                                   loudness_lufs=sound.loudness_lufs))
            (d / "audio.json").write_text(json.dumps({"stems": [s.model_dump() for s in stems],
                                                      "gain_db": sound.gain_db, "peak_db": sound.peak_db,
                                                      "target_lufs": p.loudness_lufs}))
            write_handoffs(plan, clips, d, stems=[s for s in stems if s.name in handoffs.AUDIO_STEMS])
            save_png(_contact_sheet(plan, st), d / "storyboard.png")
            # 3. The ASS subtitles and the burned-in delivery variant.
            t1 = time.perf_counter()
            subtitles.write_ass(plan.subtitles, d / "subtitles.ass", width=plan.width, height=plan.height,
                                title=plan.title)
            if p.burn_subtitles and plan.subtitles:
                subtitles.burn_in(d / "episode.mp4", d / "subtitles.ass", d / "episode_subtitled.mp4",
                                  ffmpeg=ffmpeg, crf=p.crf, preset=p.x264_preset)
            subs_s = time.perf_counter() - t1
            claim.spend([Timing("assemble", max(claim.elapsed() - mix_s - subs_s, 0.0)), Timing("mix", mix_s),
                         Timing("subtitles", subs_s)])
    return measured(claim)
