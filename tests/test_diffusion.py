"""Diffusers backend on CPU with tiny random-weight pipelines built in code (tests/tiny_diffusers.py):
loading and validation, seeds and determinism, batching across shots, layered plates, sheets,
ControlNet, SD 1.5- and SDXL-style models, prompts within the token limit, consistency score."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub, whatever a test does

import numpy as np
import pytest

pytest.importorskip("diffusers")

from stages.records import ProfileError  # noqa: E402
from stages.records import Camera  # noqa: E402
from pipeline import registry  # noqa: E402
from stages import prompts  # noqa: E402
from stages.consistency import consistency_score  # noqa: E402
from stages.diffusion import DiffusersKeyframes, character_crops, plate_key  # noqa: E402
from stages.keyframes import DiffusionSettings  # noqa: E402
from tests.test_previz import request, scene  # noqa: E402
from tests.tiny_diffusers import save_sd15, save_sdxl, write_tokenizer  # noqa: E402

W, H = 64, 48
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"sd15": save_sd15(root / "sd15", controlnet=root / "controlnet"), "controlnet": root / "controlnet",
            "sdxl": save_sdxl(root / "sdxl")}


def settings(model: Path, **kw) -> DiffusionSettings:
    base = dict(model=str(model), device="cpu", dtype="float32", steps=2, strength=0.6, batch_size=4, layered=False,
                characters={"MAYA": "girl, orange bob hair", "KENJI": "boy, glasses"})
    return DiffusionSettings(**(base | kw))


def shots():
    """Two shots in the street, one in a classroom; each with its own seed."""
    return [request(seed=0), request("sc01-sh02", Camera.CLOSE_UP, dialogue=[("MAYA", "Hi")], keyframes=(0, 47), seed=1),
            request("sc02-sh01", Camera.MEDIUM, location="CLASSROOM", heading="INT. CLASSROOM - DAY", keyframes=(0, 47),
                    seed=2)]


def images(out) -> list[bytes]:
    return [f.image.tobytes() for k in out for f in k.frames]


# --------------------------------------------------------------------------- validation


def test_missing_weights_is_one_profile_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ProfileError, match="no-such-model.*model_index.json"):
        DiffusersKeyframes(width=W, height=H, settings=settings(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="directory without model_index.json"):
        DiffusersKeyframes(width=W, height=H, settings=settings(tmp_path / "empty"))
    with pytest.raises(ProfileError, match="'someone/not-cached'.*local Hugging Face cache"):
        DiffusersKeyframes(width=W, height=H, settings=settings(Path("someone/not-cached")))
    # failed at the path check, before any loading (the messages above are resolve_local's)


def test_unusable_device_or_settings_fail_before_loading(models):
    with pytest.raises(ProfileError, match="CUDA"):
        DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], device="cuda"))
    with pytest.raises(ProfileError, match="float16"):
        DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], dtype="float16"))
    with pytest.raises(ProfileError, match="layered"):
        DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], mode="txt2img", layered=True))
    with pytest.raises(ProfileError, match="steps"):
        DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], steps=1, strength=0.5))
    with pytest.raises(ProfileError, match="controlnet"):
        DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], controlnet=str(models["sd15"] / "x")))


def test_importing_the_registry_does_not_import_torch():
    code = ("import sys; from pipeline import registry; assert 'diffusers' in registry.names('keyframes'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(REPO))
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- determinism and batching


@pytest.mark.parametrize("mode", ["img2img", "txt2img"])
def test_same_seeds_give_identical_bytes_across_instances(models, mode):
    a = registry.get("keyframes", "diffusers").build(settings(models["sd15"], mode=mode), width=W, height=H)(shots())
    b = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], mode=mode))(shots())
    assert [k.shot for k in a] == ["sc01-sh01", "sc01-sh02", "sc02-sh01"]
    assert [[f.index for f in k.frames] for k in a] == [[0, 24, 47], [0, 47], [0, 47]]
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for k in a for f in k.frames)
    assert images(a) == images(b)
    assert len(set(images(a))) == len(images(a))  # every keyframe its own seed (and init image)


def test_different_keyframes_get_different_seeds_even_with_the_same_init(models):
    still = request(static=True, keyframes=(0, 47))  # same init image at both keyframes
    out = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"]))([still])
    a, b = (f.image for f in out[0].frames)
    assert a.tobytes() != b.tobytes()


def test_batching_across_shots_matches_one_by_one(models):
    batched = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], batch_size=7))
    single = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], batch_size=1))
    a, b = batched(shots()), single(shots())
    assert batched.stats["batches"] == 1 and single.stats["batches"] == 7
    # per-image generators make the noise identical; batched CPU kernels may still round differently
    diff = max(int(np.abs(x.image.astype(int) - y.image.astype(int)).max())
               for ka, kb in zip(a, b) for x, y in zip(ka.frames, kb.frames))
    assert diff <= 2, diff


# --------------------------------------------------------------------------- layered, sheets, consistency


def test_layered_generates_one_plate_per_location(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], layered=True))
    two_street_shots_and_a_classroom = shots()
    out = kf(two_street_shots_and_a_classroom)
    assert kf.stats["plates"] == 2 and kf.stats["images"] == 2 + 7
    # the pipeline caches plates as their own nodes and passes them in: then no plate is generated
    plates = {key: kf.background_plate(*key)
              for key in dict.fromkeys(plate_key(r.scene) for r in two_street_shots_and_a_classroom)}
    again = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], layered=True))
    assert images(again(two_street_shots_and_a_classroom, plates=plates)) == images(out)
    assert again.stats["plates"] == 0


def test_compose_puts_the_generated_plate_under_the_figures(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], layered=True))
    shot = scene(camera=Camera.WIDE)
    plate = kf.background_plate(*plate_key(shot))
    with_figures = kf.compose(plate, shot, 0.5)
    sheets = {n: kf.character_sheet(n) for n in ("MAYA", "KENJI")}
    with_sheets = kf.compose(plate, shot, 0.5, sheets)
    assert with_figures.shape == with_sheets.shape == (H, W, 3)
    corner = (slice(0, 6), slice(0, 6))  # nobody stands in the top-left corner of a wide shot
    # wide shots zoom the plate by 1.18 about the bottom edge: compare with the same warp
    assert np.abs(with_figures[corner].astype(int) - with_sheets[corner].astype(int)).max() <= 1
    assert with_figures.tobytes() != with_sheets.tobytes()


def test_character_sheets_have_a_stable_seed_per_name(models):
    a = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"]))
    b = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"]))
    maya = a.character_sheet("MAYA")
    assert maya.shape == (H, H, 3)
    assert maya.tobytes() == b.character_sheet("MAYA").tobytes()
    assert maya.tobytes() != a.character_sheet("KENJI").tobytes()


def test_consistency_score_is_high_for_the_same_colours_and_lower_for_others():
    rng = np.random.default_rng(0)
    red = np.zeros((20, 10, 3), np.uint8)
    red[..., 0] = 200
    blue = red[..., ::-1].copy()
    noisy_red = np.clip(red.astype(int) + rng.integers(-8, 8, red.shape), 0, 255).astype(np.uint8)
    score = consistency_score({"A": [red, noisy_red, red], "B": [red, blue], "C": [blue]})
    assert score["A"] > 0.9 and score["B"] < 0.1 and score["C"] == 1.0


def test_consistency_of_generated_keyframes_can_be_measured(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"]))
    shot_list = shots()[:2]
    crops: dict[str, list[np.ndarray]] = {}
    for sp, k in zip(shot_list, kf(shot_list)):
        for t, f in zip(sp.times, k.frames):
            for name, crop in character_crops(sp.scene, t, f.image).items():
                crops.setdefault(name, []).append(crop)
    score = consistency_score(crops)
    assert set(score) == {"MAYA", "KENJI"} and all(0.0 <= v <= 1.0 for v in score.values())


# --------------------------------------------------------------------------- other model families, ControlNet


def test_sdxl_style_pipeline_end_to_end(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sdxl"], layered=True))
    assert type(kf.pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    out = kf(shots()[:1])
    again = DiffusersKeyframes(width=W, height=H, settings=settings(models["sdxl"], layered=True))(shots()[:1])
    assert images(out) == images(again) and out[0].frames[0].image.shape == (H, W, 3)


def test_controlnet_conditions_on_the_previz_line_art(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], controlnet=str(models["controlnet"])))
    assert type(kf.pipe).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    plain = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"]))
    assert images(kf(shots()[:1])) != images(plain(shots()[:1]))


def test_generation_short_side_is_resized_to_the_profile_size(models):
    kf = DiffusersKeyframes(width=96, height=54, settings=settings(models["sd15"], gen_short_side=32))
    assert kf.gen_size == (56, 32)  # multiples of 2 × the VAE factor (tiny VAE: 2)
    assert kf(shots()[:1])[0].frames[0].image.shape == (54, 96, 3)


# --------------------------------------------------------------------------- prompts


def test_prompts_keep_style_and_characters_and_drop_action_first(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")  # one token per character
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    st = settings(Path("unused"))
    sp = scene(action="Maya walks toward Kenji. She waves at him. The wind blows leaves across the street.")
    full = prompts.shot_prompt(sp, st, max_tokens=None, count_tokens=count)
    assert all(w in full for w in (st.style_prompt, "Maya (girl, orange bob hair)", "city street", "wind blows"))
    for limit in (180, 120, 75, 40):
        text = prompts.shot_prompt(sp, st, max_tokens=limit, count_tokens=count)
        assert count(text) <= limit, (limit, text)
    mid = prompts.shot_prompt(sp, st, max_tokens=180, count_tokens=count)
    assert "Maya (girl, orange bob hair)" in mid and "wind blows" not in mid
    short = prompts.shot_prompt(sp, st, max_tokens=75, count_tokens=count)
    assert short.startswith(st.style_prompt) and "Maya" in short and "walks" not in short
    est = prompts.shot_prompt(sp, st, max_tokens=20)  # no tokenizer: word estimate
    assert prompts.estimate_tokens(est) <= 20


def test_backend_prompts_fit_the_clip_limit(models):
    kf = DiffusersKeyframes(width=W, height=H, settings=settings(models["sd15"], mode="txt2img"))
    assert kf.max_tokens == 75
    sp = scene(action="Maya walks toward Kenji. " * 20)
    text = kf._prompt(prompts.shot_prompt, sp)
    assert len(kf.pipe.tokenizer(text).input_ids) <= 77


# --------------------------------------------------------------------------- GPU calibration script


def test_calibrate_gpu_smoke_runs_every_family_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    import calibrate_gpu
    out = tmp_path / "calibration_gpu.csv"
    assert calibrate_gpu.main(["--smoke", "--out", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(out.open()))
    assert {r["model"] for r in rows} == {"sd15", "sdxl", "qwen-image"}
    assert all(float(r["seconds_per_image"]) > 0 and "random weights" in r["source"] for r in rows)
