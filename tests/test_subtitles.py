"""ASS subtitles (pysubs2) per speaker in the CJK font, inside the safe area, and burned in with
the real ffmpeg (libass, fontsdir): pixels change only inside the subtitle box."""
from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np
import pysubs2
import pytest

from stages import subtitles
from stages.records import SubtitleCue

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
CUES = [SubtitleCue(index=1, start_s=0.2, end_s=1.2, character="林小雨", text="等一下。这张请柬上，写的是我的名字。",
                    shot="sc01-sh01"),
        SubtitleCue(index=2, start_s=1.3, end_s=2.4, character="BOB", text="Hello there, how are you today?",
                    shot="sc01-sh02")]


def test_the_imageio_ffmpeg_binary_has_libass():
    filters = subprocess.run([FFMPEG, "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    assert " ass " in filters and " subtitles " in filters


@pytest.mark.parametrize("width, height", [(360, 640), (640, 360)])
def test_ass_parses_with_a_style_per_speaker_in_the_cjk_font_inside_the_safe_area(tmp_path, width, height):
    subtitles.write_ass(CUES, tmp_path / "s.ass", width=width, height=height, title="t")
    subs = pysubs2.load(str(tmp_path / "s.ass"))
    assert subs.info["PlayResX"] == str(width) and subs.info["PlayResY"] == str(height)
    assert set(subs.styles) == {"林小雨", "BOB"}
    assert {s.fontname for s in subs.styles.values()} == {"Noto Sans CJK SC"}
    assert len({(c.r, c.g, c.b) for c in (s.primarycolor for s in subs.styles.values())}) == 2  # a colour each
    assert [e.style for e in subs.events] == ["林小雨", "BOB"]
    assert [(e.start, e.end) for e in subs.events] == [(200, 1200), (1300, 2400)]
    style = subs.styles["BOB"]
    if height > width:  # 9:16: above the bottom 22 % and clear of the right-hand buttons
        assert style.marginv >= 0.2 * height and style.marginr > style.marginl
    x0, y0, x1, y1 = subtitles.subtitle_box(width, height)
    assert 0 < x0 < x1 < width and 0 < y0 < y1 < height


def test_cjk_wraps_between_characters_and_never_starts_a_line_with_punctuation():
    lines = subtitles.wrap("等一下。这张请柬上，写的是我的名字。", 7)
    assert "".join(lines) == "等一下。这张请柬上，写的是我的名字。"
    assert len(lines) > 1 and all(ln[0] not in "，。" for ln in lines)
    assert subtitles.wrap("Hello there, how are you today?", 7) == ["Hello there,", "how are you", "today?"]


def _frames(path, width: int, height: int) -> np.ndarray:
    raw = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3).astype(np.int16)


def test_burned_subtitles_change_pixels_only_inside_the_subtitle_box(tmp_path):
    w, h = 180, 320
    video = tmp_path / "v.mp4"
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r=24:d=3",
                    "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", str(video)], check=True)
    subtitles.write_ass(CUES, tmp_path / "s.ass", width=w, height=h)
    subtitles.burn_in(video, tmp_path / "s.ass", tmp_path / "burned.mp4", ffmpeg=FFMPEG, crf=12)
    a, b = _frames(video, w, h), _frames(tmp_path / "burned.mp4", w, h)
    assert a.shape == b.shape
    x0, y0, x1, y1 = subtitles.subtitle_box(w, h)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    diff = np.abs(a - b).max(axis=3)  # (frames, h, w)
    assert diff[:, ~inside].mean() < 2.0  # outside: re-encoding noise only
    assert (diff[12][inside] > 60).mean() > 0.02  # 0.5 s: the first cue is on screen
    assert (diff[70][inside] > 60).mean() < 0.002  # 2.9 s: no cue
