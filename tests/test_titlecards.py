"""Title cards, transitions and two-shots on screen (#14.5), with the previz engine for real.

Centred text is drawn (its ink differs from the card's ground and its bounding box is centred
in the safe area of the aspect), transitions reach the shot record, the panel and the frames
(fades), and every speaker of a two-shot is inside the frame (the layout record: placements
through the camera)."""
from __future__ import annotations

import numpy as np
import pytest

from stages import transitions
from stages.draw import CARD_INK, render_cel
from stages.records import Camera, DialogueLine, Shot, ShotScene
from stages.script import load_episode
from stages.staging import character_style, figure_extent, frame_camera, layout, safe_area
from stages.storyboard import render_panel

SIZES = {"16:9": (320, 180), "9:16": (180, 320)}

SCRIPT = """Title: Cards

FADE IN:

EXT. PIER - DUSK

Gulls circle the empty pier.

CUT TO:

INT. CAFE - NIGHT

MIO
You came back.

KAI
I never left.

> FADE OUT.

>THE END<

>未完待续<
"""


def _scene(shot: Shot) -> ShotScene:
    return ShotScene(shot=shot, heading="EXT. PIER - DUSK", location="PIER", setting="EXT", time_of_day="DUSK")


def _card(text: str) -> Shot:
    return Shot(id="sc01-sh01", scene=1, camera=Camera.WIDE, duration_s=2.5, characters=[], action=text,
                static=True, line=1, title=text)


def _ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.abs(image.astype(np.int16) - CARD_INK).max(axis=2) < 24)
    assert len(xs), "no card ink in the frame"
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_script_carries_the_card_text_and_the_transitions(tmp_path):
    path = tmp_path / "cards.fountain"
    path.write_text(SCRIPT, encoding="utf-8")
    shots = load_episode(path).shots
    assert [s.title for s in shots] == [None, None, "THE END", "未完待续"]
    assert shots[0].transition_in == "FADE IN:" and shots[0].transition_out == "CUT TO:"
    assert shots[1].transition_out == "FADE OUT." and len(shots[1].dialogue) == 2
    assert shots[2].static and shots[2].characters == [] and shots[2].camera == Camera.WIDE


@pytest.mark.parametrize("aspect", ["16:9", "9:16"])
@pytest.mark.parametrize("text", ["THE END", "未完待续",
                                  "Three weeks later, somewhere far beyond the harbour town and its lights"])
def test_centred_text_is_drawn_centred_in_the_safe_area(aspect, text):
    width, height = SIZES[aspect]
    card = render_cel(_scene(_card(text)), 0.0, width, height, {})
    ground = render_cel(_scene(_card(" ")), 0.0, width, height, {})
    assert card.shape == (height, width, 3)
    x0, y0, x1, y1 = _ink_box(card)
    sx0, sy0, sx1, sy1 = safe_area(width, height)
    # 1. The ink lies in the safe area, its box centred there (within a few pixels of rounding
    #    and glyph side bearings).
    assert sx0 - 1 <= x0 and x1 <= sx1 + 1 and sy0 - 1 <= y0 and y1 <= sy1 + 1
    assert abs((x0 + x1) / 2 - (sx0 + sx1) / 2) <= 0.03 * width
    assert abs((y0 + y1) / 2 - (sy0 + sy1) / 2) <= 0.04 * height
    # 2. The card area differs from the card's ground without the text; outside it, nothing.
    changed = np.abs(card.astype(np.int16) - ground).max(axis=2) > 40
    assert changed[y0:y1, x0:x1].mean() > 0.1
    assert not changed[: max(0, y0 - 4)].any() and not changed[y1 + 4:].any()


def test_long_card_text_wraps_onto_lines_and_a_short_one_is_large():
    width, height = SIZES["9:16"]
    short = _ink_box(render_cel(_scene(_card("THE END")), 0.0, width, height, {}))
    long = _ink_box(render_cel(_scene(_card("Three weeks later, somewhere far beyond the harbour town")),
                               0.0, width, height, {}))
    assert long[3] - long[1] > 2 * (short[3] - short[1])  # more than one line
    assert short[3] - short[1] >= height / 20  # large type for a short card


def test_the_storyboard_panel_shows_the_card_and_the_transitions():
    shot = _card("未完待续")
    plain = render_panel(_scene(shot), width=200, aspect="9:16")
    tagged = render_panel(_scene(shot.model_copy(update={"transition_in": "FADE IN:", "transition_out": "CUT TO:"})),
                          width=200, aspect="9:16")
    blank = render_panel(_scene(_card(" ")), width=200, aspect="9:16")
    frame_h = round(200 * 16 / 9)  # the panel's picture; the caption lies below it
    ink = (plain[:frame_h].max(axis=2) < 60) & (blank[:frame_h].max(axis=2) >= 60)
    assert ink.sum() > 200  # the letters in ink on the sketch
    corners = np.abs(tagged[:frame_h].astype(np.int16) - plain[:frame_h]).max(axis=2) > 0
    ys, xs = np.nonzero(corners)
    assert len(xs) and ys.min() > frame_h * 0.8  # the tags sit in the lower corners only
    assert xs.min() < 40 and xs.max() > 160


def test_fades_ramp_to_and_from_black_and_cuts_do_nothing():
    shot = _card("THE END").model_copy(update={"transition_in": "FADE IN:", "transition_out": "FADE OUT."})
    levels = transitions.fade_levels(shot, 60, 24)
    assert levels[0] == 0 and levels[-1] == 0 and levels[30] == 1
    assert np.all(np.diff(levels[:12]) > 0) and np.all(np.diff(levels[-12:]) < 0)
    frames = [np.full((4, 4, 3), 200, np.uint8)] * 60
    out = list(transitions.faded(frames, levels))
    assert out[0].max() == 0 and out[30].min() == 200 and 0 < out[6].mean() < 200
    assert transitions.fade_levels(shot.model_copy(update={"transition_in": None, "transition_out": "CUT TO:"}),
                                   60, 24) is None
    assert transitions.kind("DISSOLVE TO:") == "dissolve" and transitions.kind("淡出：") == "fade_out"


def _two_shot(camera: Camera, names=("MIO", "KAI")) -> Shot:
    lines = [DialogueLine(character=n, text="Hello there, how are you?", line=3 + i) for i, n in enumerate(names)]
    return Shot(id="sc01-sh02", scene=1, camera=camera, duration_s=4.0, characters=list(names), action="",
                dialogue=lines, line=3)


@pytest.mark.parametrize("aspect", ["16:9", "9:16"])
@pytest.mark.parametrize("camera", [Camera.MEDIUM, Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP, Camera.WIDE])
@pytest.mark.parametrize("names", [("MIO", "KAI"), ("林小雨", "苏婉"), ("MIO", "KAI", "RIN")])
def test_every_speaker_of_a_two_shot_is_in_frame(aspect, camera, names):
    width, height = SIZES[aspect]
    shot = _two_shot(camera, names)
    for t in (0.0, 0.3, 0.7, 1.0):
        placements = layout(shot, t=t, width=width, height=height)
        view = frame_camera(shot, placements, width=width, height=height)
        assert {p.name for p in placements} == set(names)
        for p in placements:
            x0, y0, x1, y1 = figure_extent(p, view, width, height)
            assert 0 <= x0 and x1 <= width, f"{p.name} is cut at t={t}: {x0:.0f}..{x1:.0f} of {width}"
            assert 0 <= y0 and y0 + (y1 - y0) / 5 <= height, f"{p.name}'s head is out of frame at t={t}"


def test_a_two_shot_is_still_tighter_than_the_wide_and_one_speaker_keeps_the_close_up():
    width, height = SIZES["16:9"]
    medium, wide = _two_shot(Camera.MEDIUM), _two_shot(Camera.WIDE)
    scale = lambda s: frame_camera(s, layout(s, t=0.5, width=width, height=height),  # noqa: E731
                                   width=width, height=height).scale
    assert scale(medium) > scale(wide)
    single = _two_shot(Camera.CLOSE_UP).model_copy(update={"dialogue": _two_shot(Camera.CLOSE_UP).dialogue[:1]})
    placements = layout(single, t=0.5, width=width, height=height)
    view = frame_camera(single, placements, width=width, height=height)
    kai = next(p for p in placements if p.name == "KAI")
    assert figure_extent(kai, view, width, height)[0] > width  # the close-up shows its speaker only


def test_drawn_two_shot_shows_both_speakers():
    width, height = SIZES["9:16"]
    shot = _two_shot(Camera.MEDIUM)
    frame = render_cel(_scene(shot), 0.5, width, height, {})
    placements = layout(shot, t=0.5, width=width, height=height)
    view = frame_camera(shot, placements, width=width, height=height)
    for p in placements:  # each figure's own flat skin and top colours inside its box
        x0, y0, x1, y1 = (int(round(v)) for v in figure_extent(p, view, width, height))
        region = frame[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
        style = character_style(p.name)
        for colour in (style.skin, style.top):
            assert (np.abs(region.astype(np.int16) - colour).max(axis=2) <= 2).sum() > 30, (p.name, colour)


def test_the_diffusers_backend_sets_the_card_text_on_what_it_generates(tmp_path):
    """A tiny random-weight SD 1.5 (tests/tiny_diffusers.py): the card's letters are drawn on the
    generated image, centred in the safe area, not left to the model."""
    pytest.importorskip("diffusers")
    from stages.diffusion import DiffusersKeyframes
    from stages.keyframes import DiffusionSettings
    from stages.records import KeyframeRequest
    from tests.tiny_diffusers import save_sd15

    model = save_sd15(tmp_path / "sd15")
    settings = DiffusionSettings(model=str(model), device="cpu", dtype="float32", steps=2, layered=False)
    width, height = 96, 160
    card = KeyframeRequest(scene=_scene(_card("未完待续")), indices=[0], times=[0.0], seed=3)
    plain = KeyframeRequest(scene=_scene(_card(" ").model_copy(update={"title": None, "id": "sc01-sh02"})), indices=[0], times=[0.0],
                            seed=3)
    drawn, bare = DiffusersKeyframes(width=width, height=height, settings=settings)([card, plain])
    image = drawn.frames[0].image
    x0, y0, x1, y1 = _ink_box(image)
    sx0, sy0, sx1, sy1 = safe_area(width, height)
    assert abs((x0 + x1) / 2 - (sx0 + sx1) / 2) <= 0.05 * width and abs((y0 + y1) / 2 - (sy0 + sy1) / 2) <= 0.05 * height
    assert np.abs(image.astype(np.int16) - bare.frames[0].image).max() > 100
