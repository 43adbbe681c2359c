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

from pipeline.calibration import Calibration
from pipeline.cost import PriceCatalog
from pipeline.models import Episode, Profile, RenderPlan, Scene, Shot, ShotPlan, SubtitleCue
from pipeline.errors import ProfileError
from stages import assemble, encode, inbetween, keyframes, storyboard
from stages import audit as audit_mod

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


def make_plan(episode: Episode, profile: Profile, *, calibration: Calibration,
              prices: PriceCatalog, script_sha256: str) -> RenderPlan:
    if profile.backend not in keyframes.BACKENDS:
        raise ProfileError(f"profile {profile.name}: unknown backend {profile.backend!r}; "
                           f"known: {', '.join(sorted(keyframes.BACKENDS))}")
    if profile.interpolation not in inbetween.INTERPOLATORS:
        raise ProfileError(f"profile {profile.name}: unknown interpolation {profile.interpolation!r}; "
                           f"known: {', '.join(sorted(inbetween.INTERPOLATORS))}")
    width, height = profile.size
    frame_mpx = width * height / 1e6
    panel_w = profile.storyboard_width
    panel_mpx = panel_w * panel_w * (9 / 16 if profile.aspect == "16:9" else 16 / 9) / 1e6
    rows = {
        "storyboard": calibration.row("storyboard", profile.backend),
        "keyframes": calibration.row("keyframes", profile.backend),
        "inbetween": calibration.row("inbetween", f"{profile.interpolation}:{profile.flow_preset}"),
        "encode": calibration.row("encode", f"x264:{profile.x264_preset}"),
        "assemble": calibration.row("assemble", "concat"),
    }

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
            units = {"storyboard": (1, panel_mpx), "keyframes": (len(keys), frame_mpx),
                     "inbetween": (len(drawings) - len(keys), frame_mpx), "encode": (frames, frame_mpx)}
            est_s = {stage: round(rows[stage].seconds(*units[stage]), 4) for stage in STAGES}
            est_y = {stage: prices.cost(est_s[stage], rows[stage].device, 1.0) for stage in STAGES}
            if audit is not None:  # one more drawing by the keyframe backend, compared with its in-between
                est_s["audit"] = round(rows["keyframes"].seconds_per_unit_mpx * frame_mpx, 4)
                est_y["audit"] = prices.cost(est_s["audit"], rows["keyframes"].device, 1.0)
            shots.append(ShotPlan(
                shot=shot, scene_heading=scene.heading, location=scene.location, setting=scene.setting,
                time_of_day=scene.time_of_day,
                start_frame=start, frames=frames, drawings=drawings, keyframes=keys,
                held_frames=frames - len(drawings), audit_frame=audit, keys={"storyboard": sb_key, "keyframes": kf_key, "clip": clip_key},
                estimate_seconds=est_s, estimate_yuan=est_y))
            # 4. Subtitles on the quantised timeline, so they match the encoded frames.
            cues += subtitle_cues(shot, start / profile.fps, (start + frames) / profile.fps, len(cues) + 1)
            start += frames

    asm_key = content_key("assemble", assemble.VERSION, {"title": episode.title},
                          [s.keys["clip"] for s in shots] + [s.keys["storyboard"] for s in shots]
                          + [c.model_dump_json() for c in cues])
    asm_s = rows["assemble"].seconds(start, frame_mpx)
    return RenderPlan(
        title=episode.title, source=episode.source, script_sha256=script_sha256, profile=profile,
        width=width, height=height, shots=shots, subtitles=cues, assemble_key=asm_key,
        assemble_estimate_seconds=round(asm_s, 4),
        assemble_estimate_yuan=prices.cost(asm_s, rows["assemble"].device, 1.0))


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
