"""Previz backend: real rendering at tiny sizes — determinism, characters, plates, motion,
framing, CJK captions, panel and contact-sheet shapes, backend registry."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stages.records import Camera, DialogueLine, KeyframeRequest, ProfileError, Shot, ShotScene

from pipeline import registry
from stages import backgrounds, draw, staging
from stages.keyframes import PrevizKeyframes, PrevizSettings
from stages.storyboard import contact_sheet, render_panel

W, H = 128, 72


def scene(shot_id="sc01-sh01", camera=Camera.WIDE, characters=("MAYA", "KENJI"), action="Maya walks toward Kenji.",
          dialogue=(), location="CITY STREET", tod="DAY", heading=None, static=False, frames=48) -> ShotScene:
    shot = Shot(id=shot_id, scene=1, camera=camera, duration_s=frames / 24, characters=list(characters), action=action,
                dialogue=[DialogueLine(character=c, text=t, line=2) for c, t in dialogue], static=static, line=1)
    return ShotScene(shot=shot, heading=heading or f"EXT. {location} - {tod}", location=location, time_of_day=tod)


def request(*args, frames=48, keyframes=(0, 24, 47), seed=0, **kwargs) -> KeyframeRequest:
    """One shot's keyframes, at the times a plan gives them (frame / (frames - 1))."""
    return KeyframeRequest(scene=scene(*args, frames=frames, **kwargs), indices=list(keyframes),
                           times=[k / max(frames - 1, 1) for k in keyframes], seed=seed)


def luminance(img: np.ndarray) -> float:
    return float((img.astype(np.float64) @ [0.299, 0.587, 0.114]).mean())


def test_keyframes_are_deterministic_across_instances():
    shots = [request(), request("sc01-sh02", Camera.CLOSE_UP, dialogue=[("MAYA", "Hi")])]
    a = PrevizKeyframes(width=W, height=H)(shots)
    b = PrevizKeyframes(width=W, height=H)(shots)
    assert [k.shot for k in a] == ["sc01-sh01", "sc01-sh02"]
    assert [f.index for f in a[0].frames] == [0, 24, 47]
    for ka, kb in zip(a, b):
        for fa, fb in zip(ka.frames, kb.frames):
            assert fa.image.shape == (H, W, 3) and fa.image.dtype == np.uint8
            assert fa.image.tobytes() == fb.image.tobytes()


def test_render_is_identical_in_a_fresh_process():
    code = ("import hashlib, sys; sys.path.insert(0, '.');"
            "from tests.test_previz import scene; from stages.draw import render_cel;"
            "print(hashlib.sha256(render_cel(scene(), 0.5, 128, 72, {}).tobytes()).hexdigest())")
    import hashlib
    here = hashlib.sha256(draw.render_cel(scene(), 0.5, W, H, {}).tobytes()).hexdigest()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.strip() == here


def test_characters_get_distinct_stable_styles():
    names = ["MAYA", "KENJI", "AIKO", "林小雨", "陈浩"]
    styles = [staging.character_style(n) for n in names]
    assert staging.character_style("MAYA") == styles[0]
    looks = {(s.hair, s.top, s.bottom, s.hair_shape) for s in styles}
    assert len(looks) == len(names)
    # and it shows in pixels: the same shot with a different character differs
    a = draw.render_cel(scene(characters=("MAYA",), action="", static=True), 0, W, H, {})
    b = draw.render_cel(scene(characters=("KENJI",), action="", static=True), 0, W, H, {})
    assert not np.array_equal(a, b)


def test_plates_differ_by_location_and_time_of_day():
    day = backgrounds.background_plate("CITY STREET", "DAY", "EXT", W, H)
    night = backgrounds.background_plate("CITY STREET", "NIGHT", "EXT", W, H)
    park = backgrounds.background_plate("CITY PARK", "DAY", "EXT", W, H)
    room = backgrounds.background_plate("KENJI'S APARTMENT", "NIGHT", "INT", W, H)
    assert day.shape == (H, W, 3) and day.dtype == np.uint8
    assert luminance(night) < luminance(day) - 40
    assert not np.array_equal(day, park) and not np.array_equal(night, room)
    assert backgrounds.sky_kind("夜") == "night" and backgrounds.sky_kind("SUNSET") == "dusk" and backgrounds.sky_kind("CONTINUOUS") == "day"
    assert backgrounds.setting_of("INT. OFFICE - DAY", "OFFICE") == "INT" and backgrounds.setting_of("内景 教室 - 夜", "教室") == "INT"


def test_plate_cache_is_filled_once_per_location_and_size():
    cache: dict = {}
    gen = PrevizKeyframes(width=W, height=H)
    gen._plates = cache
    gen([request(), request("sc01-sh02"), request("sc02-sh01", location="PARK")])
    assert len(cache) == 2


def test_moving_shot_moves_and_static_shot_holds():
    moving = scene(action="Maya runs left.")
    frames = [draw.render_cel(moving, t, W, H, {}) for t in (0.0, 0.5, 1.0)]
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
    p0 = staging.layout(moving.shot, t=0.0, width=W, height=H)
    p1 = staging.layout(moving.shot, t=1.0, width=W, height=H)
    assert p1[0].x < p0[0].x - 0.3 * W  # MAYA ran left, a long way
    static = scene(action="Maya runs left.", static=True)
    still = [draw.render_cel(static, t, W, H, {}) for t in (0.0, 0.5, 1.0)]
    assert all(np.array_equal(still[0], f) for f in still[1:])


def test_cjk_verbs_and_idle_motion():
    shot = scene(characters=("林小雨", "陈浩"), action="林小雨走向陈浩。陈浩转身。").shot
    a, b = staging.layout(shot, t=0.0, width=W, height=H), staging.layout(shot, t=1.0, width=W, height=H)
    assert b[0].x > a[0].x  # approached
    assert a[1].facing != b[1].facing  # turned
    idle = scene(action="They talk quietly.", dialogue=[("MAYA", "So?")])
    assert not np.array_equal(draw.render_cel(idle, 0.0, W, H, {}), draw.render_cel(idle, 0.4, W, H, {}))


def test_close_up_shows_a_bigger_figure_than_wide():
    def figure_area(camera):
        shot = scene(camera=camera, characters=("MAYA",), action="", static=True)
        cel = draw.render_cel(shot, 0.0, W, H, {})
        plate = draw.render_cel(scene(camera=camera, characters=(), action="", static=True), 0.0, W, H, {})
        return int((np.abs(cel.astype(int) - plate.astype(int)).sum(axis=2) > 30).sum())

    wide, close = figure_area(Camera.WIDE), figure_area(Camera.CLOSE_UP)
    assert close > 4 * wide > 0


def test_wrap_text_latin_by_word_cjk_by_character():
    font = draw.load_font(12)
    latin = draw.wrap_text("the quick brown fox jumps over the lazy dog", font, 60)
    assert len(latin) > 1 and all(not line.startswith(" ") for line in latin)
    assert " ".join(latin) == "the quick brown fox jumps over the lazy dog"
    cjk = draw.wrap_text("明天我就要离开这座城市了。", font, 50)
    assert "".join(cjk) == "明天我就要离开这座城市了。" and len(cjk) > 1
    assert not any(line.startswith("。") for line in cjk)


def test_panel_shapes_and_cjk_caption():
    shot = scene(characters=("林小雨", "陈浩"), action="林小雨走向陈浩。", dialogue=[("陈浩", "这是给我的吗？")],
                location="咖啡店", tod="黄昏", heading="内景 咖啡店 - 黄昏")
    portrait = render_panel(shot, width=72, aspect="9:16")
    landscape = render_panel(shot, width=128, aspect="16:9")
    assert portrait.shape[1] == 72 and portrait.shape[0] > 128 and portrait.dtype == np.uint8
    assert landscape.shape[1] == 128 and landscape.shape[0] > 72
    caption = landscape[72:]
    assert (caption < 128).any(axis=2).sum() > 100  # text was set, not a blank box
    assert draw.load_font(10).getname()[0] == "Noto Sans CJK SC"
    with pytest.raises(ValueError, match="aspect"):
        render_panel(shot, width=128, aspect="4:3")


def test_contact_sheet_grid():
    panel = render_panel(scene(), width=96, aspect="16:9")
    sheet = contact_sheet([panel] * 5, title="Episode 1 第一集")
    ph, pw, _ = panel.shape
    assert sheet.dtype == np.uint8 and sheet.shape[1] > 4 * pw and sheet.shape[0] > 2 * ph
    assert sheet[-2, -2].tolist() == [255, 255, 255]
    tall = render_panel(scene(), width=72, aspect="9:16")
    assert contact_sheet([tall] * 7, title="x").shape[1] > 6 * tall.shape[1]
    assert contact_sheet([tall] * 7, title="x", columns=2).shape[1] < 3 * tall.shape[1]
    with pytest.raises(ValueError):
        contact_sheet([], title="empty")


def test_backend_registry():
    entry = registry.get("keyframes", "previz")
    assert entry.settings is PrevizSettings
    assert isinstance(entry.build(PrevizSettings(), width=W, height=H), PrevizKeyframes)
    with pytest.raises(ProfileError, match="previz"):
        registry.get("keyframes", "sdxl")


def test_keyframes_at_the_real_sizes():
    """Every requested keyframe drawn at both real sizes (their speed is a calibration row,
    measured by experiments/calibrate_cpu.py)."""
    shots = [request("t1", Camera.WIDE, ("MAYA", "KENJI", "AIKO"), "They walk.", keyframes=(0, 12, 24, 36, 47)),
             request("t2", Camera.CLOSE_UP, dialogue=[("MAYA", "Hi")], keyframes=(0, 12, 24, 36, 47))]
    for w, h in ((640, 360), (1280, 720)):
        out = PrevizKeyframes(width=w, height=h)(shots)
        assert [k.shot for k in out] == ["t1", "t2"]
        assert [[f.index for f in k.frames] for k in out] == [[0, 12, 24, 36, 47]] * 2
        assert all(f.image.shape == (h, w, 3) and f.image.dtype == np.uint8 for k in out for f in k.frames)
