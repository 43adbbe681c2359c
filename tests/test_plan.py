"""The plan is data: frames, drawings, keyframes, holds, keys, subtitles and estimates."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import registry
from pipeline.config import resolve_profile
from pipeline.plan import drawing_schedule, make_plan, moving_inbetweens
from stages.keyframes import PrevizKeyframes
from stages.records import Camera, DialogueLine, Episode, ProfileError, Scene, Shot



def _shot(i: int, **kw) -> Shot:
    data = dict(id=f"sc01-sh{i:02d}", scene=1, camera=Camera.MEDIUM, duration_s=2.0, characters=["AYA"],
                action="Aya walks to the window.", dialogue=[], line=10 + i)
    data.update(kw)
    return Shot(**data)


def _episode(shots: list[Shot]) -> Episode:
    scene = Scene(index=1, heading="INT. ROOM - NIGHT", location="ROOM", setting="INT", time_of_day="NIGHT",
                  line=1, shots=shots)
    return Episode(title="Test", source="test.fountain", scenes=[scene], characters=["AYA"])




def plan_of(shots, calibration, prices, profile="draft", **overrides):
    return make_plan(_episode(shots), resolve_profile(profile, overrides), calibration=calibration,
                     prices=prices, script_sha256="0" * 64)


def test_profiles_sizes_and_aspect():
    assert resolve_profile("draft").size == (640, 360)
    assert resolve_profile("draft", {"aspect": "9:16"}).size == (360, 640)
    assert resolve_profile("standard").size == (1280, 720)
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        resolve_profile("nope")
    with pytest.raises(ProfileError, match="aspect"):
        resolve_profile("draft", {"aspect": "4:3"})


def test_drawing_schedule_on_twos_with_stride():
    profile = resolve_profile("draft")  # on twos, a keyframe every 6 drawings
    drawings, keys = drawing_schedule(48, profile, static=False)
    assert drawings == list(range(0, 48, 2))
    assert keys == [0, 12, 24, 36, 46]  # every 6th drawing, plus the last drawing
    assert drawing_schedule(48, profile, static=True) == ([0], [0])


def test_plan_frames_keys_and_holds(calibration, prices):
    plan = plan_of([_shot(1, duration_s=2.0), _shot(2, duration_s=1.5, static=True)], calibration, prices)
    a, b = plan.shots
    assert (a.frames, b.frames) == (48, 36)
    assert (a.start_frame, b.start_frame) == (0, 48)
    assert a.held_frames == 24 and b.held_frames == 35
    assert plan.total_frames == 84 and plan.total_keyframes == len(a.keyframes) + 1
    assert plan.estimated_cost_yuan > 0
    assert set(a.estimate_yuan) == {"storyboard", "keyframes", "inbetween", "encode", "audit"}
    assert a.audit_frame == 6 and b.audit_frame is None  # farthest from keyframes 0 and 12; a hold has none
    assert set(b.estimate_yuan) == {"storyboard", "keyframes", "inbetween", "encode"}


def test_content_keys_follow_content_not_position(calibration, prices):
    one, two, three = _shot(1), _shot(2, action="Aya sits."), _shot(3, action="Aya sleeps.")
    base = plan_of([one, two, three], calibration, prices)
    edited = plan_of([one, two.model_copy(update={"action": "Aya stands."}), three], calibration, prices)
    assert base.shots[0].keys == edited.shots[0].keys
    assert base.shots[1].keys["keyframes"] != edited.shots[1].keys["keyframes"]
    assert base.shots[2].keys["keyframes"] == edited.shots[2].keys["keyframes"]
    assert base.shots[2].keys["clip"] == edited.shots[2].keys["clip"]
    # A profile field that only the encoder reads leaves the keyframes alone.
    crf = plan_of([one, two, three], calibration, prices, crf=30)
    assert crf.shots[0].keys["keyframes"] == base.shots[0].keys["keyframes"]
    assert crf.shots[0].keys["clip"] != base.shots[0].keys["clip"]


def test_subtitles_inside_their_shot_and_ordered(calibration, prices):
    lines = [DialogueLine(character="AYA", text="Is anyone there?", line=3),
             DialogueLine(character="KEN", text="只有我。", line=5),
             DialogueLine(character="AYA", text="Both at once!", dual=True, line=7)]
    plan = plan_of([_shot(1), _shot(2, dialogue=lines, characters=["AYA", "KEN"], duration_s=4.0)],
                   calibration, prices)
    cues = plan.subtitles
    assert [c.index for c in cues] == [1, 2, 3]
    start, end = 48 / 24, (48 + 96) / 24
    assert all(start <= c.start_s < c.end_s <= end for c in cues)
    assert cues[0].end_s <= cues[1].start_s
    assert (cues[2].start_s, cues[2].end_s) == (cues[1].start_s, cues[1].end_s)  # dual dialogue shares a slot


def test_pairs_previz_draws_alike_are_known_from_the_plan_and_not_priced(calibration, prices):
    """Previz draws the same frame wherever nobody on screen moves: the plan names those keyframe
    pairs exactly (checked against the drawn pixels), and prices no in-between inside them."""
    empty = _shot(2, characters=[], action="Rain runs down the window.", duration_s=2.5)
    titled = _shot(3, title="THE END", duration_s=1.5)  # the plate behind it follows Aya
    plan = plan_of([_shot(1), empty, titled], calibration, prices)
    drawer = PrevizKeyframes(width=plan.width, height=plan.height)
    for shot in plan.shots:
        drawn = [f.image for f in drawer([shot.keyframe_request()])[0].frames]
        assert shot.still_pairs == [i for i in range(len(drawn) - 1) if np.array_equal(drawn[i], drawn[i + 1])]
    moving, still, title = plan.shots
    assert moving.still_pairs == [] and still.still_pairs == list(range(len(still.keyframes) - 1))
    assert title.still_pairs == []
    row = calibration.row("inbetween", "flow:ultrafast", "cpu")
    assert still.estimate_seconds["inbetween"] == round(row.seconds(0, plan.width * plan.height / 1e6), 4)
    assert moving.estimate_seconds["inbetween"] > still.estimate_seconds["inbetween"]
    assert moving_inbetweens(still.drawings, still.keyframes, still.still_pairs) == 0
    assert moving_inbetweens(moving.drawings, moving.keyframes) == len(moving.drawings) - len(moving.keyframes)
    # A backend that knows no still pairs (diffusers draws every keyframe from its own noise) prices them all.
    assert registry.get("keyframes", "diffusers").still_pairs(None, still.scene, still.keyframe_times, 64, 64) == []


def test_the_assembly_is_priced_per_shot(calibration, prices):
    """Its cost follows the shots it joins (clips, contact-sheet panels, hand-off items), so a row
    learned on one script's assembly scales to a script of another length."""
    from pipeline.calibration import CalibrationRow
    from pipeline.plan import ASSEMBLE_ROW

    row = CalibrationRow(stage="assemble", backend=ASSEMBLE_ROW, device="cpu", unit="shot", overhead_s=0.1,
                         seconds_per_unit=0.05, seconds_per_unit_mpx=0.001, source="test", measured_at="")
    learned = calibration.overlay([row], cluster="test", location="test")
    two, four = (plan_of([_shot(i) for i in range(1, n + 1)], learned, prices) for n in (2, 4))
    mpx = two.width * two.height / 1e6
    for plan, n in ((two, 2), (four, 4)):
        assert plan.episode_estimate_seconds["assemble"] == pytest.approx(
            0.1 + 0.05 * n + 0.001 * plan.total_frames * mpx, abs=1e-4)
