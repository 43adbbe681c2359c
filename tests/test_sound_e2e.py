"""A tiny vertical episode with two speakers and a music bed, rendered through the CLI with the real
eSpeak voice, real ffmpeg and a real local Ray cluster: the episode has sound as long as its
picture, each line's speech lies inside its cue, the loudness is on target, the master carries a
soft subtitle track and the burned-in variant differs from it only inside the subtitle area."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pysubs2
import pytest

from stages import mix, subtitles

from .conftest import REPO

pytestmark = pytest.mark.slow
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SCRIPT = """Title: Rooftop
Music: rain.ogg

EXT. SCHOOL ROOFTOP - NIGHT

[[shot: medium, 1s]]
AYA waits by the fence.

AYA
Is anyone there?

@林小雨
只有我。

[[shot: wide, 1s]]
Rain falls on the empty rooftop.
"""


def anim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("sound")
    script = root / "rooftop.fountain"
    script.write_text(SCRIPT, encoding="utf-8")
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "anoisesrc=color=brown:amplitude=0.4:d=2",
                    "-c:a", "libvorbis", str(root / "rain.ogg")], check=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "ANIM_STORE": str(root / "store"), "MLFLOW_ARTIFACTS_DESTINATION": str(root / "mlartifacts")}
    common = [str(script), "--profile", "draft", "--aspect", "9:16", "--set", "short_side=144"]
    before = anim("plan", *common, env=env)
    done = anim("render", *common, "--out", str(root / "out"), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    after = anim("plan", *common, env=env)
    return root / "out", before, after


def test_anim_plan_says_which_timing_it_uses(rendered):
    _, before, after = rendered
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    assert "timing: reading-speed estimate (0 of 2 lines spoken so far" in before.stdout
    assert "timing: measured speech (2 of 2 lines)" in after.stdout
    assert "re-render now: 0 of " in after.stdout and "(0 nodes to run" in after.stdout  # timed as rendered


def test_the_episode_has_sound_as_long_as_its_picture_on_the_loudness_target(rendered):
    out, _, _ = rendered
    plan = json.loads((out / "plan.json").read_text())
    fps = plan["profile"]["fps"]
    frames = sum(s["frames"] for s in plan["shots"])
    header = subprocess.run([FFMPEG, "-hide_banner", "-i", str(out / "episode.mp4")], capture_output=True,
                            text=True).stderr
    assert "Audio: aac" in header and "Subtitle: mov_text" in header and "(chi)" in header
    audio = mix.decode(out / "episode.mp4", ffmpeg=FFMPEG)
    assert abs(len(audio) / mix.RATE - frames / fps) <= 1 / fps
    assert abs(mix.loudness(audio) - plan["profile"]["loudness_lufs"]) < 1.0
    stems = {s["name"]: s for s in json.loads((out / "audio.json").read_text())["stems"]}
    assert set(stems) == {"dialogue", "music", "mix"}
    assert all((out / s["path"]).is_file() for s in stems.values())
    cost = json.loads((out / "cost.json").read_text())
    billed = {r["stage"] for r in cost["records"] if r["yuan"] > 0 and not r["cached"]}
    assert {"voice", "mix", "subtitles", "assemble"} <= billed


def test_each_line_is_spoken_inside_its_cue_and_the_cut_holds_it(rendered):
    out, _, _ = rendered
    plan = json.loads((out / "plan.json").read_text())
    assert plan["speech_timing"] == "measured"
    fps, breath = plan["profile"]["fps"], plan["profile"]["breath_s"]
    for shot in plan["shots"]:
        said = [v["spoken_s"] for v in plan["voices"] if v["line"]["shot"] == shot["scene"]["shot"]["id"]]
        assert all(v["measured"] for v in plan["voices"])
        assert shot["frames"] / fps >= sum(said) + breath * len(said)  # the cut holds the lines as spoken
    audio = mix.decode(out / "dialogue.wav", ffmpeg=FFMPEG)
    for cue in plan["subtitles"]:
        assert cue["start_s"] <= cue["speech_start_s"] < cue["speech_end_s"] <= cue["end_s"]
        a, b = int(cue["speech_start_s"] * mix.RATE), int(cue["speech_end_s"] * mix.RATE)
        assert np.sqrt(np.mean(audio[a:b] ** 2)) > 0.01  # the dialogue stem speaks there
    # the soft track in the master holds the same cues
    soft = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(out / "episode.mp4"), "-map", "0:s:0", "-f", "srt",
                           "pipe:1"], capture_output=True, text=True, check=True).stdout
    assert "Is anyone there?" in soft and "只有我。" in soft


def test_the_burned_variant_differs_from_the_master_only_inside_the_subtitle_area(rendered):
    out, _, _ = rendered
    plan = json.loads((out / "plan.json").read_text())
    w, h, fps = plan["width"], plan["height"], plan["profile"]["fps"]
    ass = pysubs2.load(str(out / "subtitles.ass"))
    assert [e.style for e in ass.events] == ["AYA", "林小雨"]

    def frames(name: str) -> np.ndarray:
        raw = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(out / name), "-f", "rawvideo", "-pix_fmt",
                              "rgb24", "pipe:1"], capture_output=True, check=True).stdout
        return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3).astype(np.int16)

    master, burned = frames("episode.mp4"), frames("episode_subtitled.mp4")
    assert master.shape == burned.shape
    x0, y0, x1, y1 = subtitles.subtitle_box(w, h)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    diff = np.abs(master - burned).max(axis=3)
    # outside: the second encode's noise only (a few levels), never a drawn stroke
    assert diff[:, ~inside].mean() < 4.0 and (diff[:, ~inside] > 40).mean() < 0.001
    cue = plan["subtitles"][0]
    on = int((cue["start_s"] + cue["end_s"]) / 2 * fps)
    assert (diff[on][inside] > 30).mean() > 0.02  # the cue is drawn (pale text, dark outline: a dark plate hides half)
