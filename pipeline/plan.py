"""Episode + Profile → RenderPlan. Pure: no Ray, no I/O, no clocks.

Per shot the plan fixes the frame count, where each drawing starts (animating on
ones/twos/threes), which drawings are generated keyframes (every ``keyframe_stride``-th
drawing plus the last, or a single drawing for a held static shot), the content key of each
stage's output and an estimate of each stage's seconds and yuan from the calibration table
and the price catalog.

Content keys hash the stage, its code version, the backend and parameters that change its
output, and the keys of its inputs. A shot's content key covers the shot's own content
(camera, duration, characters, action, dialogue, location, time of day), not its position,
so editing one shot does not change the keys of the shots after it.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pipeline.calibration import Calibration, CalibrationRow
from pipeline.cost import PriceCatalog
from stages.records import Episode, Scene, Shot, SubtitleCue
from pipeline.models import Profile, RenderPlan, ShotPlan
from stages.records import ProfileError
from stages import assemble, encode, inbetween, keyframes, storyboard
from stages import audit as audit_mod
from stages.backgrounds import setting_of

STAGES = ("storyboard", "keyframes", "inbetween", "encode")
# Subtitle placement inside a shot: a short lead-in, a gap between cues, a tail before the cut.
SUB_LEAD_S, SUB_GAP_S, SUB_TAIL_S = 0.15, 0.08, 0.10
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
    """The in-between drawing farthest from any keyframe (ties: the earliest), or None."""
    best, best_gap = None, 0
    for d in drawings:
        if d in keys:
            continue
        gap = min(abs(d - k) for k in keys)
        if gap > best_gap:
            best, best_gap = d, gap
    return best


def _speech_weight(text: str) -> float:
    cjk = len(_CJK.findall(text))
    words = len(_CJK.sub(" ", text).split())
    return max(cjk / 4.5 + words / 2.6, 0.3)


def subtitle_cues(shot: Shot, start_s: float, end_s: float, first_index: int) -> list[SubtitleCue]:
    """Place a shot's dialogue inside its span, each line's share by its speaking time.

    Dual dialogue shares the slot of the line before it. Cues never cross the shot's cut.
    """
    slots: list[list[int]] = []
    for i, line in enumerate(shot.dialogue):
        if line.dual and slots:
            slots[-1].append(i)
        else:
            slots.append([i])
    if not slots:
        return []
    weights = [max(_speech_weight(shot.dialogue[i].text) for i in slot) for slot in slots]
    usable = (end_s - start_s) - SUB_LEAD_S - SUB_TAIL_S - SUB_GAP_S * (len(slots) - 1)
    usable = max(usable, 0.05 * len(slots))
    t = start_s + SUB_LEAD_S
    cues: list[SubtitleCue] = []
    for slot, weight in zip(slots, weights):
        length = usable * weight / sum(weights)
        for i in slot:
            line = shot.dialogue[i]
            cues.append(SubtitleCue(index=first_index + len(cues), start_s=round(t, 3),
                                    end_s=round(min(t + length, end_s), 3),
                                    character=line.character, text=line.text, shot=shot.id))
        t += length + SUB_GAP_S
    return cues


# Which calibration row prices a backend's keyframes: (backend id, device). Add a backend: add a line.
KEYFRAME_CALIBRATION = {
    "previz": lambda p: ("previz", "cpu"),
    "diffusers": lambda p: (f"diffusers:{p.diffusion.family}:s{p.diffusion.steps}",
                            "cpu" if p.diffusion.device == "cpu" else f"gpu:{p.diffusion.gpu_type}"),
}


def _generation_mpx(profile: Profile) -> float:
    """Megapixels of one generated keyframe: the profile size, or the diffusion generation size."""
    w, h = profile.size
    gen = profile.diffusion.gen_short_side if profile.diffusion else None
    return w * h / 1e6 if not gen else (gen * gen * max(w, h) / min(w, h)) / 1e6


# What each in-betweener's calibration row is called.
INBETWEEN_CALIBRATION = {
    "flow": lambda p: f"flow:{p.flow_preset}",
    "crossfade": lambda p: "crossfade",
    "rife": lambda p: "rife",
}


def calibration_keys(profile: Profile) -> dict[str, tuple[str, str, str]]:
    """(backend id, device, unit) of the calibration row that prices each stage of this profile.

    Storyboard panels are always drawn by previz on a CPU.
    """
    if profile.backend == "diffusers" and profile.diffusion is None:
        raise ProfileError(f"profile {profile.name}: backend 'diffusers' needs a [diffusion] table")
    kf_backend, kf_device = KEYFRAME_CALIBRATION[profile.backend](profile)
    return {
        "storyboard": ("previz", "cpu", "panel"),
        "keyframes": (kf_backend, kf_device, "keyframe"),
        "inbetween": (INBETWEEN_CALIBRATION[profile.interpolation](profile), "cpu", "inbetween"),
        "encode": (f"x264:{profile.x264_preset}", "cpu", "frame"),
        "assemble": ("concat", "cpu", "frame"),
    }


def stage_rows(profile: Profile, calibration: Calibration) -> dict[str, CalibrationRow]:
    """The calibration row that prices each stage of this profile."""
    return {stage: calibration.row(stage, backend, device)
            for stage, (backend, device, _) in calibration_keys(profile).items()}


def make_plan(episode: Episode, profile: Profile, *, calibration: Calibration,
              prices: PriceCatalog, script_sha256: str) -> RenderPlan:
    if profile.backend not in keyframes.BACKENDS or profile.backend not in KEYFRAME_CALIBRATION:
        raise ProfileError(f"profile {profile.name}: unknown backend {profile.backend!r}; "
                           f"known: {', '.join(sorted(keyframes.BACKENDS))}")
    if profile.interpolation not in inbetween.INTERPOLATORS or profile.interpolation not in INBETWEEN_CALIBRATION:
        raise ProfileError(f"profile {profile.name}: unknown interpolation {profile.interpolation!r}; "
                           f"known: {', '.join(sorted(inbetween.INTERPOLATORS))}")
    if profile.interpolation == "rife" and not profile.rife_weights:
        raise ProfileError(f"profile {profile.name}: interpolation 'rife' needs rife_weights = the path of a "
                           "RIFE 4.x flownet.pkl (e.g. ../shared/data/weights/rife/flownet.pkl)")
    width, height = profile.size
    frame_mpx = width * height / 1e6
    gen_mpx = _generation_mpx(profile)
    panel_w = profile.storyboard_width
    panel_mpx = panel_w * panel_w * (9 / 16 if profile.aspect == "16:9" else 16 / 9) / 1e6
    rows = stage_rows(profile, calibration)
    kf_units = profile.diffusion.num_gpus if profile.diffusion and profile.diffusion.device != "cpu" else 1.0
    layered = bool(profile.diffusion and profile.diffusion.layered)

    shots: list[ShotPlan] = []
    cues: list[SubtitleCue] = []
    start = 0
    for scene in episode.scenes:
        for shot in scene.shots:
            # 1. Timing: frames, drawings, keyframes, holds.
            frames = max(1, round(shot.duration_s * profile.fps))
            drawings, keys = drawing_schedule(frames, profile, shot.static)
            audit = audit_drawing(drawings, keys) if profile.audit else None
            # 2. Content keys, each chained to its inputs.
            content = shot_content(shot, scene)
            sb_key = content_key("storyboard", storyboard.VERSION,
                                 {"backend": profile.backend, "width": panel_w, "aspect": profile.aspect,
                                  "heading": scene.heading}, [json.dumps(content, sort_keys=True, ensure_ascii=False)])
            kf_key = content_key("keyframes", keyframes.VERSION,
                                 {"backend": profile.backend, "size": [width, height], "frames": frames,
                                  "keyframes": keys, "audit": audit,
                                  "diffusion": profile.diffusion.model_dump() if profile.diffusion else None}, [json.dumps(content, sort_keys=True, ensure_ascii=False)])
            clip_key = content_key("clip", f"{inbetween.VERSION}+{encode.VERSION}",
                                   {"interpolation": profile.interpolation, "preset": profile.flow_preset,
                                    "rife": profile.rife_weights, "audit_version": audit_mod.VERSION,
                                    "fps": profile.fps, "drawings": drawings, "frames": frames,
                                    "crf": profile.crf, "x264": profile.x264_preset}, [kf_key])
            # 3. Estimates from calibration rows × prices.
            units = {"storyboard": (1, panel_mpx), "keyframes": (len(keys), gen_mpx),
                     "inbetween": (len(drawings) - len(keys), frame_mpx), "encode": (frames, frame_mpx)}
            est_s = {stage: round(rows[stage].seconds(*units[stage]), 4) for stage in STAGES}
            est_y = {stage: prices.cost(est_s[stage], rows[stage].device, kf_units if stage == "keyframes" else 1.0)
                     for stage in STAGES}
            if audit is not None:  # one more drawing by the keyframe backend, compared with its in-between
                est_s["audit"] = round(rows["keyframes"].seconds_per_unit_mpx * gen_mpx, 4)
                est_y["audit"] = prices.cost(est_s["audit"], rows["keyframes"].device, kf_units)
            shots.append(ShotPlan(
                shot=shot, scene_heading=scene.heading, location=scene.location, setting=scene.setting,
                time_of_day=scene.time_of_day,
                start_frame=start, frames=frames, drawings=drawings, keyframes=keys,
                held_frames=frames - len(drawings), audit_frame=audit,
                keys={"storyboard": sb_key, "keyframes": kf_key, "clip": clip_key,
                      **({"plate": _plate_key(profile, scene)} if layered else {})},
                estimate_seconds=est_s, estimate_yuan=est_y))
            # 4. Subtitles on the quantised timeline, so they match the encoded frames.
            cues += subtitle_cues(shot, start / profile.fps, (start + frames) / profile.fps, len(cues) + 1)
            start += frames

    asm_key = content_key("assemble", assemble.VERSION, {"title": episode.title},
                          [s.keys["clip"] for s in shots] + [s.keys["storyboard"] for s in shots]
                          + [c.model_dump_json() for c in cues])
    ep_s = {"assemble": round(rows["assemble"].seconds(start, frame_mpx), 4)}
    ep_y = {"assemble": prices.cost(ep_s["assemble"], rows["assemble"].device, 1.0)}
    sheets: dict[str, str] = {}
    if layered:  # one generated plate per location and time of day; one sheet per character
        sheets = {name: _sheet_key(profile, name) for name in dict.fromkeys(
            n for s in shots for n in s.shot.characters)}
        side_mpx = min(gen_mpx, gen_mpx * 9 / 16)  # square sheets at the generation short side
        ep_s["plates"] = round(rows["keyframes"].seconds(len({s.keys["plate"] for s in shots}), gen_mpx), 4)
        ep_s["sheets"] = round(rows["keyframes"].seconds(len(sheets), side_mpx), 4)
        for stage in ("plates", "sheets"):
            ep_y[stage] = prices.cost(ep_s[stage], rows["keyframes"].device, kf_units)
    return RenderPlan(
        title=episode.title, source=episode.source, script_sha256=script_sha256, profile=profile,
        width=width, height=height, shots=shots, subtitles=cues, assemble_key=asm_key, sheets=sheets,
        episode_estimate_seconds=ep_s, episode_estimate_yuan=ep_y)


def _generator_params(profile: Profile) -> dict[str, Any]:
    """Everything about the generator that changes what it draws (not where it runs)."""
    d = profile.diffusion
    return d.model_dump(exclude={"device", "offload", "num_gpus", "batch_size", "actors", "gpu_type"}) | {
        "backend": profile.backend, "gen_mpx": _generation_mpx(profile), "aspect": profile.aspect}


def _plate_key(profile: Profile, scene: Scene) -> str:
    where = [scene.location.strip().upper(), scene.time_of_day.upper(), setting_of(scene.heading, scene.location)]
    return content_key("plate", keyframes.VERSION, _generator_params(profile), where)


def _sheet_key(profile: Profile, name: str) -> str:
    return content_key("sheet", keyframes.VERSION, _generator_params(profile), [name.strip().upper()])


def plan_summary(plan: RenderPlan) -> dict[str, Any]:
    """The ``anim plan --json`` contract."""
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
    }
