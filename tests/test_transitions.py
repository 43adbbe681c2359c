"""A written dissolve on screen (#14.5): the assembly blends the two shots on the cut, for as long
as the hand-offs declare, with real ffmpeg on clips from the real encoder; frames outside the
window, the episode's length and its sound are the cut's; a dissolve edit re-assembles only."""
from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import opentimelineio as otio
import pytest

from stages import assemble, encode, handoffs, mix
from stages.assemble import Dissolve, Piece
from stages.handoffs import TimelineClip

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FPS, W, H = 24, 64, 36
FRAMES = [36, 24, 30]  # 1.5 s, 1 s, 1.25 s
HALF = handoffs.dissolve_frames(FRAMES[0], FRAMES[1], FPS)  # 6: a quarter second each side


def _pictures(k: int, n: int):
    """Shot ``k``'s ``n`` frames: a pattern of its own (dark stripes, a bright checker, mid noise), moving."""
    yy, xx = np.mgrid[0:H, 0:W]
    noise = np.random.default_rng(k).integers(90, 150, (H, W), dtype=np.uint8)
    for t in range(n):
        if k == 0:
            g = 20 + 60 * (((xx + t) // 4) % 2)
        elif k == 1:
            g = 170 + 60 * ((((xx + t) // 6) + (yy // 6)) % 2)
        else:
            g = np.roll(noise, t, axis=1)
        yield np.repeat(g.astype(np.uint8)[:, :, None], 3, axis=2)


def _encode(k: int, n: int, path: Path, keyframe_at: int | None = None) -> str:
    if keyframe_at is None:
        return encode.encode_clip(_pictures(k, n), path, width=W, height=H, fps=FPS, ffmpeg=FFMPEG).path
    # the clips' own codec arguments, plus a keyframe inside the shot (a long shot's next GOP)
    raw = b"".join(f.tobytes() for f in _pictures(k, n))
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{W}x{H}", "-framerate", str(FPS), "-i", "pipe:",
                    *encode.codec_args(fps=FPS, crf=23, preset="veryfast"),
                    "-force_key_frames", f"expr:eq(n,{keyframe_at})", str(path)], input=raw, check=True)
    return str(path)


def _gray(path: Path) -> np.ndarray:
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, H, W).astype(np.float32)


def _join(clips, path: Path, dissolves=()) -> Path:
    assemble.concat_clips(clips, path, ffmpeg=FFMPEG, dissolves=dissolves, fps=FPS,
                          codec=encode.codec_args(fps=FPS, crf=23, preset="veryfast"))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("dissolve")
    return d, [_encode(k, n, d / f"shot-{k}.mp4") for k, n in enumerate(FRAMES)]


def _window_mixes(cut: np.ndarray, shown: np.ndarray, at: int, half: int) -> list[float]:
    """For each frame of the window centred on the cut at ``at``: the share of the incoming shot
    that best explains it (least squares), after checking that it is measurably neither shot
    and is that mix, to within the noise of a second encode. Without handles the outgoing shot's
    last frame and the incoming one's first stand in beyond their ends. Window frame w of 2h is
    (w + 1) / (2h + 1) the incoming shot."""
    shares = []
    for w, f in enumerate(range(at - half, at + half)):
        a, b, x = cut[min(f, at - 1)], cut[max(f, at)], shown[f]
        share = float(np.sum((x - a) * (b - a)) / np.sum((b - a) ** 2))
        assert np.abs(x - a).mean() > 5 and np.abs(x - b).mean() > 5, f"frame {f} is one of the shots"
        residual = np.abs(x - (a + share * (b - a))).mean()
        assert residual < 0.1 * np.abs(b - a).mean(), f"frame {f} is not a mix of the two shots"
        assert abs(share - (w + 1) / (2 * half + 1)) < 0.03, f"frame {f}: {share:.3f} of the incoming shot"
        shares.append(share)
    return shares


def test_the_timing_rule_half_a_second_centred_at_most_half_of_either_shot():
    assert handoffs.dissolve_frames(36, 24, 24) == 6 and handoffs.dissolve_frames(100, 100, 12) == 3
    assert handoffs.dissolve_frames(9, 100, 24) == 4  # at most half the outgoing shot
    assert handoffs.dissolve_frames(100, 5, 24) == 2  # … and of the incoming one
    assert handoffs.dissolve_frames(1, 100, 24) == 0  # a one-frame shot: the cut stays
    assert handoffs.cut_dissolves([36, 24, 30], ["DISSOLVE TO:", "CUT TO:", None], 24) == {0: 6}
    assert handoffs.cut_dissolves([36, 24], ["叠化：", None], 24) == {0: 6}


def test_a_dissolve_blends_its_window_and_leaves_every_other_frame_as_the_cut(clips):
    d, files = clips
    cut = _gray(_join(files, d / "cut.mp4"))
    shown = _gray(_join(files, d / "dissolve.mp4", [Dissolve(0, HALF)]))
    at = FRAMES[0]
    # 1. The same length, frame for frame and by the container.
    assert len(shown) == len(cut) == sum(FRAMES)
    assert abs(assemble.probe(d / "dissolve.mp4", ffmpeg=FFMPEG).duration_s - sum(FRAMES) / FPS) <= 1 / FPS
    # 2. Inside the window: every frame a mix, from mostly the outgoing shot to mostly the incoming, symmetric.
    shares = _window_mixes(cut, shown, at, HALF)
    assert shares == sorted(shares) and 0.02 < shares[0] < 0.2 and 0.8 < shares[-1] < 0.98
    assert abs(shares[0] + shares[-1] - 1) < 0.05
    # 3. Outside it: the outgoing shot's frames and the next shot's are the cut's own (stream copies); the
    #    incoming shot's after the window were encoded again (its one GOP begins in the window): the
    #    same pictures within a second encode's noise (a few levels, where the shots differ by 150).
    assert np.array_equal(shown[:at - HALF], cut[:at - HALF])
    assert np.array_equal(shown[sum(FRAMES[:2]):], cut[sum(FRAMES[:2]):])
    again = np.abs(shown[at + HALF:sum(FRAMES[:2])] - cut[at + HALF:sum(FRAMES[:2])]).mean(axis=(1, 2))
    assert again.max() < 4.0
    # 4. It decodes without a complaint: the encoded window joins the copies.
    check = subprocess.run([FFMPEG, "-v", "error", "-i", str(d / "dissolve.mp4"), "-f", "null", "-"],
                           capture_output=True)
    assert check.returncode == 0 and not check.stderr


def test_the_copy_resumes_at_the_incoming_clips_next_keyframe(tmp_path):
    files = [_encode(0, 36, tmp_path / "a.mp4"), _encode(1, 48, tmp_path / "b.mp4", keyframe_at=12),
             _encode(2, 30, tmp_path / "c.mp4")]
    assert assemble._samples(files[1]) == (48, [0, 12])
    assert assemble.join_plan([36, 48, 30], [[0], [0, 12], [0]], [Dissolve(0, HALF)]) == [
        Piece(0, 0, 30), Piece(None, 30, 48), Piece(1, 12, 48), Piece(2, 0, 30)]
    cut = _gray(_join(files, tmp_path / "cut.mp4"))
    shown = _gray(_join(files, tmp_path / "d.mp4", [Dissolve(0, HALF)]))
    assert len(shown) == len(cut) == 114
    _window_mixes(cut, shown, 36, HALF)
    # only the window and the six frames up to the keyframe were encoded again; from it on, the clip's own
    assert np.array_equal(shown[:30], cut[:30]) and np.array_equal(shown[48:], cut[48:])


def test_a_short_shot_between_two_dissolves_is_blended_at_both_ends(tmp_path):
    frames = [20, 8, 20]
    files = [_encode(k, n, tmp_path / f"s{k}.mp4") for k, n in enumerate(frames)]
    cuts = handoffs.cut_dissolves(frames, ["DISSOLVE TO:", "DISSOLVE TO:", None], FPS)
    assert cuts == {0: 4, 1: 4}  # half the short shot on each side: the two windows meet, never overlap
    dissolves = [Dissolve(k, n) for k, n in cuts.items()]
    assert assemble.join_plan(frames, [[0]] * 3, dissolves) == [Piece(0, 0, 16), Piece(None, 16, 48)]
    cut, shown = _gray(_join(files, tmp_path / "cut.mp4")), _gray(_join(files, tmp_path / "d.mp4", dissolves))
    assert len(shown) == len(cut) == 48
    _window_mixes(cut, shown, 20, 4)
    _window_mixes(cut, shown, 28, 4)
    assert np.array_equal(shown[:16], cut[:16]) and np.abs(shown[32:] - cut[32:]).mean(axis=(1, 2)).max() < 4.0


def test_a_dissolve_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="at most half of either shot"):
        assemble.join_plan([36, 8], [[0], [0]], [Dissolve(0, 6)])
    with pytest.raises(ValueError, match="fps and codec"):
        assemble.concat_clips(["a.mp4", "b.mp4"], "out.mp4", ffmpeg=FFMPEG, dissolves=[Dissolve(0, 2)])


def test_the_hand_offs_declare_the_window_the_screen_shows(clips, tmp_path):
    d, files = clips
    shots, start = [], 0
    for k, n in enumerate(FRAMES):
        shots.append(TimelineClip(id=f"sh{k}", start_frame=start, frames=n, camera="medium", scene="INT. CAFE",
                                  action="", characters=[], keyframes=1, media=Path(files[k]).name,
                                  transition_out="DISSOLVE TO:" if k == 0 else None))
        start += n
    cuts = handoffs.cut_dissolves([s.frames for s in shots], [s.transition_out for s in shots], FPS)
    cut = _gray(_join(files, tmp_path / "cut.mp4"))
    shown = _gray(_join(files, tmp_path / "d.mp4", [Dissolve(k, n) for k, n in cuts.items()]))
    changed = [f for f in range(len(cut)) if np.abs(shown[f] - cut[f]).mean() > 3]
    # OTIO: the transition's offsets are the window on either side of the cut
    handoffs.write_timeline(shots, [], tmp_path / "timeline.otio", title="Cafe", fps=FPS)
    track = otio.adapters.read_from_file(str(tmp_path / "timeline.otio")).tracks[0]
    (t,) = [x for x in track if isinstance(x, otio.schema.Transition)]
    assert changed == list(range(FRAMES[0] - round(t.in_offset.value), FRAMES[0] + round(t.out_offset.value)))
    # 剪映: the transition on the segment before the cut lasts the whole window
    handoffs.write_jianying_draft(shots, [], tmp_path / "draft.zip", media_dir=d, title="Cafe", width=W,
                                  height=H, fps=FPS)
    with zipfile.ZipFile(tmp_path / "draft.zip") as zf:
        info = json.loads(zf.read("Cafe/draft_info.json"))
    (jt,) = info["materials"]["transitions"]
    assert jt["duration"] == round(len(changed) * 1_000_000 / FPS)


def test_the_master_keeps_its_sound_in_step(clips, tmp_path):
    d, files = clips
    picture = _join(files, tmp_path / "picture.mp4", [Dissolve(0, HALF)])
    total = sum(FRAMES) / FPS
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=frequency=330:duration={total}",
                    "-c:a", "aac", str(tmp_path / "mix.m4a")], check=True)
    assemble.mux(picture, tmp_path / "mix.m4a", None, tmp_path / "episode.mp4", ffmpeg=FFMPEG)
    video = assemble.probe(tmp_path / "episode.mp4", ffmpeg=FFMPEG)
    audio = mix.decode(tmp_path / "episode.mp4", ffmpeg=FFMPEG)
    assert video.frames == sum(FRAMES) and abs(len(audio) / mix.RATE - video.frames / FPS) <= 1 / FPS


SCRIPT = """Title: Cafe

INT. CAFE - NIGHT

Mio waits at the window.

{transition}

EXT. STREET - NIGHT

Kai walks away.
"""


def _plan(tmp_path, transition, prices, calibration):
    from pipeline.config import resolve_profile
    from pipeline.plan import make_plan
    from stages.script import load_episode

    text = SCRIPT.format(transition=transition)
    path = tmp_path / f"{hashlib.sha256(text.encode()).hexdigest()[:8]}.fountain"
    path.write_text(text, encoding="utf-8")
    return make_plan(load_episode(path), resolve_profile("draft", {}), prices=prices, calibration=calibration,
                     script_sha256=hashlib.sha256(text.encode()).hexdigest())


def test_a_dissolve_edit_re_assembles_and_draws_no_shot_again(tmp_path, prices, calibration):
    cut, dissolve = (_plan(tmp_path, t, prices, calibration) for t in ("CUT TO:", "DISSOLVE TO:"))
    assert cut.shots[0].shot.transition_out == "CUT TO:" and dissolve.shots[0].shot.transition_out == "DISSOLVE TO:"
    for a, b in zip(cut.shots, dissolve.shots):
        assert a.keys["keyframes"] == b.keys["keyframes"] and a.keys["clip"] == b.keys["clip"] and a.seed == b.seed
    assert cut.assemble_key != dissolve.assemble_key
    # a fade is the shot's own frames: it keys the clip (not the drawings)
    fade = _plan(tmp_path, "> FADE OUT.", prices, calibration)
    assert fade.shots[0].keys["keyframes"] == cut.shots[0].keys["keyframes"]
    assert fade.shots[0].keys["clip"] != cut.shots[0].keys["clip"]


RENDERED = """Title: Dissolve

INT. CAFE - NIGHT

Mio waits at the window.

MIO
Still here.

DISSOLVE TO:

EXT. STREET - NIGHT

Kai walks away.
"""


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_rendered_episode_dissolves_where_the_script_says(tmp_path, prices, calibration):
    from pipeline.config import resolve_profile
    from pipeline.plan import make_plan
    from pipeline.render import render
    from pipeline.store import open_store
    from stages.script import load_episode

    script = tmp_path / "dissolve.fountain"
    script.write_text(RENDERED, encoding="utf-8")
    plan = make_plan(load_episode(script), resolve_profile("draft", {"short_side": 72, "aspect": "9:16"}),
                     prices=prices, calibration=calibration,
                     script_sha256=hashlib.sha256(RENDERED.encode()).hexdigest())
    out = render(plan, store=open_store(tmp_path / "store"), prices=prices, ffmpeg=FFMPEG).outputs
    fps = plan.profile.fps
    k = next(i for i, s in enumerate(plan.shots) if s.shot.transition_out == "DISSOLVE TO:")
    a, b = plan.shots[k], plan.shots[k + 1]
    half = handoffs.dissolve_frames(a.frames, b.frames, fps)
    at, total = b.start_frame, sum(s.frames for s in plan.shots)

    def gray(path: Path) -> np.ndarray:  # the top half of the frame: clear of the burned-in subtitles
        raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(raw, np.uint8).reshape(-1, plan.height, plan.width)[:, :plan.height // 2].astype(
            np.float32)

    # 1. The cut: the shots' own published clips end to end; the episode and its burned-in variant differ
    #    from it exactly over the window the hand-off declares.
    cut = np.concatenate([gray(out[f"shot-{s.shot.id}.mp4"]) for s in plan.shots])
    timeline = otio.adapters.read_from_file(str(out["timeline.otio"]))
    (t,) = [x for x in timeline.tracks[0] if isinstance(x, otio.schema.Transition)]
    window = list(range(at - round(t.in_offset.value), at + round(t.out_offset.value)))
    assert half > 0 and window == list(range(at - half, at + half))
    shown = gray(out["episode.mp4"])
    assert len(shown) == len(cut) == total
    moved = np.abs(shown - cut).mean(axis=(1, 2))
    assert all(moved[f] > 5 for f in window), moved[window[0] - 2:window[-1] + 3]
    # outside it: the cut's frames (the incoming shot's after the window encoded again, at the clips' own
    # crf: a second generation, a few levels at this tiny size, no shift in level)
    assert all(moved[f] < 4 for f in range(total) if f not in window), moved
    assert abs((shown[window[-1] + 1:] - cut[window[-1] + 1:]).mean()) < 0.5
    # the burned-in variant is the master's picture, dissolve and all (above its subtitles)
    burned = gray(out["episode_subtitled.mp4"])
    assert len(burned) == total and np.abs(burned - shown).mean(axis=(1, 2)).max() < 4
    assert np.array_equal(gray(out["episode.mp4"])[:at - half], cut[:at - half])  # a stream copy before it
    # 2. Its length and its sound are the cut's.
    video = assemble.probe(out["episode.mp4"], ffmpeg=FFMPEG)
    sound = mix.decode(out["episode.mp4"], ffmpeg=FFMPEG)
    assert video.frames == total and abs(video.duration_s - total / fps) <= 1 / fps
    assert abs(len(sound) / mix.RATE - total / fps) <= 1 / fps
