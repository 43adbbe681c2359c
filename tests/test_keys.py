"""Content keys change only when pixels change: for every profile field and every setting of
the shipped backends, exactly which nodes' keys a change of it changes. Placement (GPU type,
GPU count, batch size, actors, offload, the price tier) changes none."""
from __future__ import annotations

import pytest

from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import resolve_profile
from pipeline.models import Profile
from pipeline.plan import calibration_keys, make_plan
from stages import inbetween, keyframes, voice, voice_qwen
from stages.script import load_episode

from .conftest import REPO

EPISODE = load_episode(REPO / "examples" / "shotlist.yaml")
SHOT = frozenset({"keyframes", "clip", "assemble"})  # a change to what a keyframe looks like, downstream of it
CLIP = frozenset({"clip", "assemble"})
LAYERS = frozenset({"plate", "sheet"})
NONE: frozenset[str] = frozenset()
SOUND = frozenset({"assemble"})  # the mix or the subtitles: the assembly only
VOICE = frozenset({"voice", "assemble"})  # how a line sounds: its voice node and the mix

# (base profile, field or table.setting, new value, the keys it changes)
TABLE = [
    ("draft", "name", "renamed", NONE),
    ("draft", "aspect", "9:16", frozenset({"storyboard", "contact_sheet"}) | SHOT),
    ("draft", "short_side", 480, SHOT),
    ("draft", "fps", 30, SHOT),
    ("draft", "animate_on", 1, SHOT),
    ("draft", "keyframe_stride", 3, SHOT),
    ("draft", "hold_static", False, SHOT),
    ("draft", "crf", 30, CLIP),
    ("draft", "x264_preset", "medium", CLIP),
    ("draft", "storyboard_width", 320, frozenset({"storyboard", "contact_sheet", "assemble"})),
    ("draft", "audit", False, SHOT),
    ("draft", "approval_gate", True, NONE),
    ("draft", "storyboard", "previz", NONE),
    ("draft", "interpolation", "crossfade", CLIP),
    ("draft", "flow.preset", "medium", CLIP),
    ("draft", "voice", "espeak", NONE),
    ("draft", "breath_s", 4.0, SHOT),  # shots with dialogue get longer (past their script length)
    ("draft", "loudness_lufs", -23.0, SOUND),
    ("draft", "music_db", -18.0, SOUND),
    ("draft", "duck_db", 6.0, SOUND),
    ("draft", "burn_subtitles", False, SOUND),
    ("draft", "music", "/music/bed.ogg", NONE),  # the bed's content enters the key: make_plan(bed=…)
    ("draft", "espeak.rate", 200, frozenset({"voice", "assemble"})),
    ("draft", "espeak.voices", {"KAI": {"pitch": 20}}, frozenset({"voice", "assemble"})),
    ("rife", "rife.weights", "/elsewhere/flownet.pkl", CLIP),
    ("rife", "rife.device", "cuda", CLIP),
    ("rife", "rife.passes", "one", CLIP),
    ("rife", "rife.num_gpus", 0.5, NONE),
    ("rife", "rife.gpu_type", "A100-80GB", NONE),
    ("gpu", "backend", "previz", SHOT | LAYERS),  # the layered plates and sheets go away
    ("gpu", "diffusers.model", "/models/other", SHOT | LAYERS),
    ("gpu", "diffusers.family", "sd15", SHOT | LAYERS),
    ("gpu", "diffusers.mode", "txt2img", SHOT | LAYERS),
    ("gpu", "diffusers.strength", 0.5, SHOT | LAYERS),
    ("gpu", "diffusers.steps", 8, SHOT | LAYERS),
    ("gpu", "diffusers.guidance_scale", 1.5, SHOT | LAYERS),
    ("gpu", "diffusers.dtype", "bfloat16", SHOT | LAYERS),
    ("gpu", "diffusers.device", "cpu", SHOT | LAYERS),
    ("gpu", "diffusers.controlnet", "/models/lineart", SHOT | LAYERS),
    ("gpu", "diffusers.ip_adapter", "/models/ip.safetensors", SHOT | LAYERS),
    ("gpu", "diffusers.style_prompt", "watercolour", SHOT | LAYERS),
    ("gpu", "diffusers.negative_prompt", "blurry", SHOT | LAYERS),
    ("gpu", "diffusers.characters", {"HANA": "girl, red scarf"}, SHOT | LAYERS),
    ("gpu", "diffusers.layered", False, SHOT | LAYERS),
    ("gpu", "diffusers.gen_short_side", 512, SHOT | LAYERS),
    ("gpu", "diffusers.offload", "model", NONE),
    ("gpu", "diffusers.num_gpus", 0.5, NONE),
    ("gpu", "diffusers.batch_size", 16, NONE),
    ("gpu", "diffusers.actors", 3, NONE),
    ("gpu", "diffusers.gpu_type", "H100", NONE),
    ("neural", "neural.model", "/models/other-tts", VOICE),
    ("neural", "neural.device", "cpu", VOICE),
    ("neural", "neural.dtype", "float16", VOICE),
    ("neural", "neural.rate", 1.3, VOICE),
    ("neural", "neural.voices", {"MEI": {"speaker": 2}}, VOICE),
    ("neural", "neural.num_gpus", 0.5, NONE),
    ("neural", "neural.gpu_type", "A100-80GB", NONE),
    ("vibevoice", "vibevoice.model", "/models/VibeVoice-7B-hf", VOICE),
    ("vibevoice", "vibevoice.device", "cpu", VOICE),
    ("vibevoice", "vibevoice.dtype", "float32", VOICE),
    ("vibevoice", "vibevoice.diffusion_steps", 20, VOICE),
    ("vibevoice", "vibevoice.max_line_s", 12.0, VOICE),
    ("vibevoice", "vibevoice.voices", {"MEI": {"speaker": 3}}, VOICE),  # a reference's content: test_voice_qwen
    ("vibevoice", "vibevoice.num_gpus", 0.5, NONE),
    ("vibevoice", "vibevoice.gpu_type", "A100-80GB", NONE),
]
BASES = {"draft": "draft", "rife": str(REPO / "examples" / "profiles" / "draft_rife.toml"),
         "gpu": str(REPO / "examples" / "profiles" / "standard_gpu.toml"),
         "neural": str(REPO / "examples" / "profiles" / "draft_neural_gpu.toml"),
         "vibevoice": str(REPO / "examples" / "profiles" / "draft_vibevoice_gpu.toml")}


def any_calibration(*profiles: Profile) -> Calibration:
    """A row for every stage of these profiles: keys do not depend on the numbers."""
    rows = {(s, b, d): CalibrationRow(stage=s, backend=b, device=d, unit=u, overhead_s=0.0, seconds_per_unit_mpx=0.1,
                                      source="test", measured_at="")
            for p in profiles for s, (b, d, u) in calibration_keys(p).items()}
    return Calibration(rows=list(rows.values()), paths=[])


def keys(profile: Profile, prices) -> dict[str, tuple]:
    plan = make_plan(EPISODE, profile, calibration=any_calibration(profile), prices=prices, script_sha256="0" * 64)
    return {"storyboard": tuple(s.keys["storyboard"] for s in plan.shots),
            "keyframes": tuple(s.keys["keyframes"] for s in plan.shots),
            "clip": tuple(s.keys["clip"] for s in plan.shots),
            "plate": tuple(s.keys.get("plate") for s in plan.shots), "sheet": tuple(plan.sheets.values()),
            "assemble": (plan.assemble_key,), "contact_sheet": (plan.contact_sheet_key,),
            "voice": tuple(v.key for v in plan.voices)}


def changed(base: Profile, field: str, value, prices) -> frozenset[str]:
    if "." in field:
        table, name = field.split(".")
        stage = next(s for s in base.settings if getattr(base, {"keyframes": "backend", "inbetween": "interpolation",
                                                               "storyboard": "storyboard", "voice": "voice"}[s]) == table)
        other = base.with_settings(stage, **{name: value})
    else:
        other = base.replace(**{field: value})
    before, after = keys(base, prices), keys(other, prices)
    return frozenset(stage for stage in before if before[stage] != after[stage])


@pytest.mark.parametrize("base, field, value, expected", TABLE, ids=[f"{b}:{f}" for b, f, _, _ in TABLE])
def test_which_keys_each_setting_changes(base, field, value, expected, prices):
    assert changed(resolve_profile(BASES[base]), field, value, prices) == expected


def test_the_table_lists_every_field_and_every_backend_setting():
    listed = {f for _, f, _, _ in TABLE}
    fields = set(Profile.model_fields) - {"settings"}
    settings = {f"{table}.{name}" for table, model in (("flow", inbetween.FlowSettings), ("rife", inbetween.RifeSettings),
                                                     ("diffusers", keyframes.DiffusionSettings),
                                                     ("espeak", voice.EspeakSettings),
                                                     ("neural", voice.NeuralVoiceSettings),
                                                     ("vibevoice", voice_qwen.VibeVoiceSettings))
                for name in model.model_fields}
    assert fields | settings <= listed, f"add rows for {sorted((fields | settings) - listed)}"


def test_the_price_tier_changes_no_key(prices):
    profile = resolve_profile(BASES["gpu"])
    spot = make_plan(EPISODE, profile, calibration=any_calibration(profile), prices=prices.with_tier("spot"),
                     script_sha256="0" * 64)
    on_demand = keys(profile, prices)
    assert tuple(s.keys["keyframes"] for s in spot.shots) == on_demand["keyframes"]
    assert (spot.assemble_key,) == on_demand["assemble"]
