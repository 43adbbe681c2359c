"""Episode + Profile → RenderPlan. Pure: no Ray, no I/O, no clocks.

Per shot the plan fixes the frame count, where each drawing starts (animating on
ones/twos/threes), which drawings are generated keyframes (every ``keyframe_stride``-th
drawing plus the last, or a single drawing for a held static shot), the content key of each
stage's output and an estimate of each stage's seconds and yuan from the calibration table
and the price catalog.

Content keys hash the stage, its code version, the backend and the settings that change its
output (``Backend.key_params``: never where or how it runs — GPU type, batch size, actors,
GPU count, price tier), and the keys of its inputs. A shot's content key covers the shot's
own content (camera, duration, characters, action, dialogue, location, time of day), not
its position, so editing one shot does not change the keys of the shots after it. Storyboard
keys do not depend on the keyframe backend, so approvals of panels survive a profile change
that keeps the panels.

Everything a render needs to know before running is here: every node's key (the contact
sheet's too), the plates and sheets a layered backend draws, and every estimate.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from bisect import bisect_left, bisect_right
from typing import Any, Sequence

from pipeline.calibration import Calibration, CalibrationRow
from pipeline.cost import PriceCatalog
from pipeline.models import Bed, Profile, RenderPlan, ShotPlan, VoicePlan, shot_time
from stages import assemble, encode, handoffs, inbetween, keyframes, mix, storyboard, subtitles, transitions, voice
from stages import audit as audit_mod
from stages.backgrounds import setting_of
from stages.records import Episode, Scene, ScriptError, Shot, ShotScene, Speech, SpokenLine, SubtitleCue, VoiceLine
from stages.script import MAX_EPISODE_S, MAX_SHOT_S, check_limits

STAGES = ("storyboard", "keyframes", "inbetween", "encode")
# The assembly's row: per shot (its clip joined, its panel on the contact sheet, its clip in every
# hand-off) and per frame·Mpx (the bytes copied); the mix and the burn-in have rows of their own.
ASSEMBLE_ROW = "concat+handoffs"
# A shot's first line starts this long after the cut.
SUB_LEAD_S = 0.15
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


def content_key(stage: str, version: str, params: dict[str, Any], inputs: list[str]) -> str:
    """sha256 of stage name + code version + parameters + input keys."""
    blob = json.dumps({"stage": stage, "version": version, "params": params, "inputs": inputs},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def shot_content(shot: Shot, scene: Scene) -> dict[str, Any]:
    """What a shot looks like, independent of where it sits in the episode."""
    data = shot.model_dump(mode="json", exclude={"id", "scene", "line"})
    for line in data["dialogue"]:
        line.pop("line", None)
    data.update(location=scene.location, time_of_day=scene.time_of_day, setting=scene.setting)
    return data


def drawn_content(shot: Shot, scene: Scene) -> dict[str, Any]:
    """What a shot's drawings show: its content less the transitions written around it (its
    storyboard panel tags them, its clip takes its fades, the assembly its dissolves)."""
    return {**shot_content(shot, scene), "transition_in": None, "transition_out": None}


def drawing_schedule(frames: int, profile: Profile, static: bool) -> tuple[list[int], list[int]]:
    """(drawings, keyframes) as shot-local frame indices."""
    if static and profile.hold_static:
        return [0], [0]
    drawings = list(range(0, frames, profile.animate_on))
    keys = drawings[:: profile.keyframe_stride]
    if keys[-1] != drawings[-1]:
        keys.append(drawings[-1])
    return drawings, keys


def audit_drawing(drawings: list[int], keys: list[int]) -> int | None:
    """The in-between drawing farthest from any keyframe (ties: the earliest), or None when
    there is no in-between (or no keyframe to measure it against).

    Each drawing's nearest keyframe is found by bisection: O(d log k), where trying every
    keyframe for every drawing made a 10-minute shot cost 10⁷ steps.
    """
    ordered = sorted(set(keys))
    if not ordered:
        return None
    best, best_gap = None, 0
    for d in drawings:
        i = bisect_left(ordered, d)
        if i < len(ordered) and ordered[i] == d:
            continue
        gap = min(ordered[i] - d if i < len(ordered) else math.inf, d - ordered[i - 1] if i else math.inf)
        if gap > best_gap:
            best, best_gap = d, gap
    return best


def _speech_weight(text: str) -> float:
    cjk = len(_CJK.findall(text))
    words = len(_CJK.sub(" ", text).split())
    return max(cjk / 4.5 + words / 2.6, 0.3)


def estimate_spoken_s(text: str) -> float:
    """The reading-speed estimate of a line's length (4.5 CJK characters or 2.6 words a second),
    used until its voice node has measured it."""
    return _speech_weight(text)


def voice_line(shot: Shot, index: int) -> VoiceLine:
    line = shot.dialogue[index]
    return VoiceLine(shot=shot.id, index=index, character=line.character, text=line.text,
                     language=voice.language_of(line.text))


def voice_key(profile: Profile, line: VoiceLine) -> str:
    """A line's voice: its text, language and speaker, and the backend's settings with only this
    speaker's own voice (editing one character's voice re-speaks that character's lines only)."""
    entry = profile.entry("voice")
    params = entry.key_params(profile.settings_for("voice"))
    voices = params.pop("voices", None) or {}
    params["voice"] = voices.get(line.character)
    return content_key("voice", voice.VERSION, params, [line.character, line.language, line.text])


def _slots(shot: Shot) -> list[list[int]]:
    """The shot's lines in speaking order; dual dialogue shares the slot of the line before it."""
    slots: list[list[int]] = []
    for i, line in enumerate(shot.dialogue):
        if line.dual and slots:
            slots[-1].append(i)
        else:
            slots.append([i])
    return slots


def spoken_frames(shot: Shot, spoken: list[float], profile: Profile) -> int:
    """The fewest frames that hold the shot's lines as spoken: the lead-in, each slot's longest
    line and a breath after each."""
    slots = _slots(shot)
    if not slots:
        return 0
    needed = SUB_LEAD_S + sum(max(spoken[i] for i in slot) + profile.breath_s for slot in slots)
    return math.ceil(needed * profile.fps - 1e-9)


def voiced_cues(shot: Shot, spoken: list[float], speech: list[Speech | None], start_s: float, end_s: float,
                breath_s: float, first_index: int) -> tuple[list[SubtitleCue], list[float]]:
    """Each line's voice start on the timeline and its cue, for a shot at least as long as
    ``spoken_frames``: slots follow each other with a breath between, the shot's spare time
    shared in proportion to their length; a voice starts with its window and its cue lasts
    while it speaks and a little after (at least the reading-speed estimate), never into the
    next line's window. A measured line's cue carries its speech times."""
    slots = _slots(shot)
    if not slots:
        return [], []
    length = [max(spoken[i] for i in slot) for slot in slots]
    usable = max(end_s - start_s - SUB_LEAD_S - breath_s * len(slots), sum(length))
    scale = usable / sum(length) if sum(length) > 0 else 1.0
    t = start_s + SUB_LEAD_S
    cues: list[SubtitleCue] = []
    starts = [0.0] * len(shot.dialogue)
    for slot, d in zip(slots, length):
        window = d * scale
        shown = min(window + breath_s * 0.5, max(d + 0.4, *(estimate_spoken_s(shot.dialogue[i].text) for i in slot)))
        for i in slot:  # dual dialogue: both lines speak at once and share the cue's time
            line, sp = shot.dialogue[i], speech[i]
            starts[i] = round(t, 4)
            cues.append(SubtitleCue(
                index=first_index + len(cues), start_s=round(t, 3), end_s=round(min(t + shown, end_s), 3),
                character=line.character, text=line.text, shot=shot.id,
                speech_start_s=round(t + sp.speech_start_s, 3) if sp else None,
                speech_end_s=round(t + sp.speech_end_s, 3) if sp else None))
        t += window + breath_s
    return cues, starts


def _check_spoken(episode: Episode, shot: Shot, length_s: float, end_s: float, profile: Profile,
                  measured: bool) -> None:
    """A shot its lines lengthen past the longest shot, or an episode past the longest episode, is
    the script's mistake: refused with its line, like ``check_limits``."""
    how = "as spoken" if measured else "at reading speed"
    if length_s > MAX_SHOT_S:
        raise ScriptError(episode.source, f"shot {shot.id}: its {len(shot.dialogue):,} lines take {length_s:,.0f} s "
                          f"{how} with a {profile.breath_s:g} s breath each; the longest shot is {MAX_SHOT_S:g} s: "
                          "split it into shots", shot.line)
    if end_s > MAX_EPISODE_S:
        raise ScriptError(episode.source, f"the episode reaches {end_s:,.0f} s at shot {shot.id} with its lines "
                          f"{how}; the longest episode is {MAX_EPISODE_S:g} s: split the script", shot.line)


def calibration_keys(profile: Profile) -> dict[str, tuple[str, str, str]]:
    """(backend id, device, unit) of the calibration row that prices each stage of this profile."""
    keys = {}
    for stage, unit in (("storyboard", "panel"), ("keyframes", "keyframe"), ("inbetween", "inbetween")):
        entry, settings = profile.entry(stage), profile.settings_for(stage)
        keys[stage] = (entry.calibration(settings), entry.device(settings), unit)
    keys["encode"] = (f"x264:{profile.x264_preset}", "cpu", "frame")
    keys["assemble"] = (ASSEMBLE_ROW, "cpu", "shot")
    entry, settings = profile.entry("voice"), profile.settings_for("voice")
    keys["voice"] = (entry.calibration(settings), entry.device(settings), "second")
    keys["mix"] = ("pyloudnorm+aac", "cpu", "second")
    keys["subtitles"] = (f"ass+x264:{profile.x264_preset}", "cpu", "frame")
    return keys


def stage_rows(profile: Profile, calibration: Calibration) -> dict[str, CalibrationRow]:
    """The calibration row that prices each stage of this profile."""
    return {stage: calibration.row(stage, backend, device)
            for stage, (backend, device, _) in calibration_keys(profile).items()}


def generation_mpx(profile: Profile) -> float:
    """Megapixels of one drawing as the keyframe backend generates it."""
    w, h = profile.entry("keyframes").generation_size(profile.settings_for("keyframes"), *profile.size)
    return w * h / 1e6


def panel_mpx(profile: Profile) -> float:
    w = profile.storyboard_width
    return w * w * (9 / 16 if profile.aspect == "16:9" else 16 / 9) / 1e6


def moving_inbetweens(drawings: list[int], keys: list[int], still: Sequence[int] = ()) -> int:
    """The in-betweens an in-betweener computes: those between keyframes that differ (``still``:
    the pairs drawn alike, whose in-betweens are copies)."""
    copies = sum(bisect_left(drawings, keys[i + 1]) - bisect_right(drawings, keys[i]) for i in still)
    return len(drawings) - len(keys) - copies


def shot_work(profile: Profile, frames: int, drawings: list[int], keys: list[int],
              still: Sequence[int] = ()) -> dict[str, tuple[int, float]]:
    """(units, megapixels per unit) of each stage of one shot: what its calibration row is scaled by."""
    w, h = profile.size
    frame_mpx = w * h / 1e6
    return {"storyboard": (1, panel_mpx(profile)), "keyframes": (len(keys), generation_mpx(profile)),
            "inbetween": (moving_inbetweens(drawings, keys, still), frame_mpx), "encode": (frames, frame_mpx)}


def _seed(content_json: str) -> int:
    """A 63-bit seed from the shot's content: the same shot draws the same pixels on every machine."""
    return int.from_bytes(hashlib.sha256(content_json.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


class _Pricer:
    """Seconds from a stage's calibration row, yuan from the price of the resource it holds."""

    def __init__(self, profile: Profile, calibration: Calibration, prices: PriceCatalog):
        self.rows, self.prices = stage_rows(profile, calibration), prices
        self.units = {stage: profile.resources(stage).units for stage in ("storyboard", "keyframes", "inbetween",
                                                                           "voice")}

    def __call__(self, stage: str, units: int, mpx: float, row: str | None = None,
                 marginal: bool = False) -> tuple[float, float]:
        """(seconds, yuan) of ``units`` × ``mpx`` of work on ``stage`` (priced by ``row``'s row);
        ``marginal``: work done inside another node, without the row's per-node overhead."""
        r = self.rows[row or stage]
        seconds = round(r.marginal(units, mpx) if marginal else r.seconds(units, mpx), 4)
        return seconds, self.prices.cost(seconds, r.device, self.units.get(row or stage, 1.0))


def make_plan(episode: Episode, profile: Profile, *, calibration: Calibration,
              prices: PriceCatalog, script_sha256: str, speech: dict[str, Speech] | None = None,
              bed: Bed | None = None) -> RenderPlan:
    """Every shot's timing, every node's content key and estimate: the render as data.

    ``speech``: the voice nodes' measurements by content key (``pipeline.render.stored_speech``
    reads them from the store); a shot with dialogue lasts at least its lines as spoken plus
    ``breath_s`` each — as measured where the line has a measurement, else by the reading-speed
    estimate (``RenderPlan.speech_timing`` says which). ``bed``: the music under the dialogue.

    An episode past the declared limits (``stages.script.check_limits``) is refused with a
    ScriptError naming its file and line, so frame counts stay finite and small enough to list.
    """
    check_limits(episode)
    width, height = profile.size
    price = _Pricer(profile, calibration, prices)
    entries = {stage: profile.entry(stage) for stage in ("storyboard", "keyframes", "inbetween")}
    params = {stage: e.key_params(profile.settings_for(stage)) for stage, e in entries.items()}
    kf_settings = profile.settings_for("keyframes")
    layered = entries["keyframes"].layered(kf_settings)
    shots: list[ShotPlan] = []
    cues: list[SubtitleCue] = []
    voices: list[VoicePlan] = []
    speech = speech or {}
    start = 0
    for scene in episode.scenes:
        for shot in scene.shots:
            # 1. Timing: the voice first (a shot holds its lines as spoken), then frames, drawings,
            #    keyframes, holds.
            lines = [voice_line(shot, i) for i in range(len(shot.dialogue))]
            vkeys = [voice_key(profile, ln) for ln in lines]
            said = [speech.get(k) for k in vkeys]
            spoken = [sp.duration_s if sp else estimate_spoken_s(ln.text) for sp, ln in zip(said, lines)]
            frames = max(1, round(shot.duration_s * profile.fps), spoken_frames(shot, spoken, profile))
            _check_spoken(episode, shot, frames / profile.fps, (start + frames) / profile.fps, profile,
                          measured=all(said))
            shot_cues, at = voiced_cues(shot, spoken, said, start / profile.fps, (start + frames) / profile.fps,
                                        profile.breath_s, len(cues) + 1)
            spoken_lines = [SpokenLine(character=ln.character, start_s=round(a - start / profile.fps, 4),
                                       envelope_hz=sp.envelope_hz, envelope=sp.envelope)
                            for ln, sp, a in zip(lines, said, at) if sp is not None]
            drawings, keys = drawing_schedule(frames, profile, shot.static)
            audit = audit_drawing(drawings, keys) if profile.audit else None
            shot_scene = ShotScene(shot=shot, heading=scene.heading, location=scene.location, setting=scene.setting,
                                   time_of_day=scene.time_of_day, speech=spoken_lines,
                                   duration_s=frames / profile.fps if spoken_lines else None)
            still = entries["keyframes"].still_pairs(kf_settings, shot_scene, [shot_time(k, frames) for k in keys],
                                                     width, height)
            # 2. Content keys, each chained to its inputs.
            content = json.dumps(shot_content(shot, scene), sort_keys=True, ensure_ascii=False)
            drawn = json.dumps(drawn_content(shot, scene), sort_keys=True, ensure_ascii=False)
            fade_in, fade_out = transitions.fades(shot)
            sb_key = content_key("storyboard", storyboard.VERSION,
                                 {**params["storyboard"], "width": profile.storyboard_width,
                                  "aspect": profile.aspect, "heading": scene.heading}, [content])
            kf_key = content_key("keyframes", keyframes.VERSION,
                                 {**params["keyframes"], "size": [width, height], "frames": frames,
                                  "keyframes": keys, "audit": audit,
                                  "speech": [[k, ln.start_s] for k, ln in zip(
                                      [k for k, sp in zip(vkeys, said) if sp], spoken_lines)]}, [drawn])
            clip_key = content_key("clip", f"{inbetween.VERSION}+{encode.VERSION}+{transitions.VERSION}",
                                   {"interpolation": params["inbetween"], "audit_version": audit_mod.VERSION,
                                    "fps": profile.fps, "drawings": drawings, "frames": frames,
                                    "crf": profile.crf, "x264": profile.x264_preset,
                                    **({"fades": [fade_in, fade_out]} if fade_in or fade_out else {})}, [kf_key])
            node_keys = {"storyboard": sb_key, "keyframes": kf_key, "clip": clip_key}
            if layered:
                node_keys["plate"] = _plate_key(profile, scene)
            # 3. Estimates from calibration rows × prices.
            est = {stage: price(stage, *work) for stage, work in shot_work(profile, frames, drawings, keys, still).items()}
            if audit is not None:  # one more drawing by the keyframe backend, compared with its in-between
                est["audit"] = price("keyframes", 1, generation_mpx(profile), marginal=True)
            for i, (ln, k, sp, a) in enumerate(zip(lines, vkeys, said, at)):
                secs, yuan = price("voice", 1, spoken[i])
                voices.append(VoicePlan(id=f"{shot.id}#{i + 1}", key=k, line=ln, start_s=a, spoken_s=spoken[i],
                                        measured=sp is not None, estimate_seconds=secs, estimate_yuan=yuan))
            shots.append(ShotPlan(
                scene=shot_scene, start_frame=start, frames=frames, drawings=drawings, keyframes=keys, still_pairs=still,
                held_frames=frames - len(drawings), audit_frame=audit, seed=_seed(drawn), keys=node_keys,
                estimate_seconds={k: s for k, (s, _) in est.items()}, estimate_yuan={k: y for k, (_, y) in est.items()}))
            # 4. Subtitles on the quantised timeline, so they match the encoded frames.
            cues += shot_cues
            start += frames
    plan = _with_episode_nodes(episode, profile, shots, cues, price, script_sha256, layered, voices, bed)
    return plan.model_copy(update={"speech_timing": "measured" if all(v.measured for v in voices) else "estimate"})


def _with_episode_nodes(episode: Episode, profile: Profile, shots: list[ShotPlan], cues: list[SubtitleCue],
                        price: _Pricer, script_sha256: str, layered: bool, voices: list[VoicePlan],
                        bed: Bed | None) -> RenderPlan:
    """The plan with its episode-level nodes: assemble (with the mix and the subtitles), the
    contact sheet, plates and sheets."""
    width, height = profile.size
    frames = sum(s.frames for s in shots)
    sound = {"loudness_lufs": profile.loudness_lufs, "music_db": profile.music_db, "duck_db": profile.duck_db,
             "bed": bed.sha256 if bed else None, "burn": profile.burn_subtitles, "crf": profile.crf,
             "x264": profile.x264_preset, "voices": [[v.key, v.start_s] for v in voices]}
    dissolves = handoffs.cut_dissolves([s.frames for s in shots], [s.shot.transition_out for s in shots], profile.fps)
    asm_key = content_key("assemble", f"{assemble.VERSION}+{handoffs.VERSION}+{mix.VERSION}+{subtitles.VERSION}",
                          {"title": episode.title, "sound": sound, "dissolves": sorted(dissolves.items())},
                          [s.keys["clip"] for s in shots] + [s.keys["storyboard"] for s in shots]
                          + [c.model_dump_json() for c in cues])
    sheet_key = content_key("sheet", storyboard.VERSION, {"title": episode.title},
                            [s.keys["storyboard"] for s in shots])
    est = {"assemble": price("assemble", len(shots), frames * width * height / 1e6 / max(len(shots), 1)),
           "mix": price("mix", 1, frames / profile.fps)}
    if voices:  # one node per line, priced in its VoicePlan
        est["voice"] = (sum(v.estimate_seconds for v in voices), sum(v.estimate_yuan for v in voices))
    if profile.burn_subtitles and cues:
        est["subtitles"] = price("subtitles", frames, width * height / 1e6)
    plates: dict[str, list[str]] = {}
    sheets: dict[str, str] = {}
    if layered:  # one generated plate per location and time of day; one sheet per character
        plates = {s.keys["plate"]: [s.scene.location, s.scene.time_of_day,
                                    setting_of(s.scene.heading, s.scene.location)] for s in shots}
        sheets = {name: _sheet_key(profile, name) for name in dict.fromkeys(
            n for s in shots for n in s.shot.characters)}
        gen_mpx = generation_mpx(profile)
        side_mpx = min(gen_mpx, gen_mpx * 9 / 16)  # square sheets at the generation short side
        est["plates"] = price("plates", len(plates), gen_mpx, row="keyframes")
        est["sheets"] = price("sheets", len(sheets), side_mpx, row="keyframes")
    return RenderPlan(
        title=episode.title, source=episode.source, script_sha256=script_sha256, profile=profile,
        width=width, height=height, shots=shots, subtitles=cues, assemble_key=asm_key,
        contact_sheet_key=sheet_key, plates=plates, sheets=sheets, voices=voices, bed=bed,
        episode_estimate_seconds={k: s for k, (s, _) in est.items()},
        episode_estimate_yuan={k: y for k, (_, y) in est.items()})


def _generator_params(profile: Profile) -> dict[str, Any]:
    """Everything about the keyframe generator that changes what it draws (not where it runs)."""
    return profile.entry("keyframes").key_params(profile.settings_for("keyframes")) | {
        "gen_mpx": generation_mpx(profile), "aspect": profile.aspect}


def _plate_key(profile: Profile, scene: Scene) -> str:
    where = [scene.location.strip().upper(), scene.time_of_day.upper(), setting_of(scene.heading, scene.location)]
    return content_key("plate", keyframes.VERSION, _generator_params(profile), where)


def _sheet_key(profile: Profile, name: str) -> str:
    return content_key("sheet", keyframes.VERSION, _generator_params(profile), [name.strip().upper()])


def plan_summary(plan: RenderPlan) -> dict[str, Any]:
    """The ``anim plan --json`` contract (the full plan; ``pipeline.schedule`` adds what a render
    would recompute now)."""
    return {
        "title": plan.title,
        "profile": plan.profile.name,
        "width": plan.width,
        "height": plan.height,
        "fps": plan.profile.fps,
        "shots": [{"id": s.shot.id, "duration_s": s.frames / plan.profile.fps, "frames": s.frames,
                   "keyframes": len(s.keyframes), "keyframe_indices": s.keyframes,
                   "drawings": len(s.drawings), "held_frames": s.held_frames,
                   "estimated_cost_yuan": sum(s.estimate_yuan.values())} for s in plan.shots],
        "total_frames": plan.total_frames,
        "duration_s": plan.duration_s,
        "estimated_cost_yuan": plan.estimated_cost_yuan,
        "estimated_cost_by_stage_yuan": plan.estimate_by_stage(),
        "speech_timing": plan.speech_timing,
        "voices": [{"id": v.id, "character": v.line.character, "start_s": v.start_s, "spoken_s": v.spoken_s,
                    "measured": v.measured} for v in plan.voices],
    }
