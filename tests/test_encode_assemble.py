"""Encoding and assembly with the real ffmpeg binary shipped by imageio-ffmpeg."""
from __future__ import annotations

import os

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import srt

from stages.records import StageError
from stages.records import SubtitleCue
from stages.assemble import concat_clips, probe, write_png, write_srt
from stages.encode import Clip, encode_clip

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
W, H, FPS = 64, 36, 24


def _frames(n: int, seed: int, shape=(H, W, 3)):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 256, shape, dtype=np.uint8)


def _encode(frames, path, **kw):
    return encode_clip(frames, path, width=W, height=H, fps=FPS, ffmpeg=FFMPEG, shot="sh01", **kw)


def test_encode_and_concat_keep_exact_frames_and_duration(tmp_path):
    a = _encode(_frames(12, 0), tmp_path / "a.mp4")
    b = _encode(_frames(7, 1), tmp_path / "b 'quoted' 镜头.mp4")  # concat list escaping
    assert a == Clip(str(tmp_path / "a.mp4"), 12, W, H, FPS)
    assert b.frames == 7

    out = tmp_path / "episode.mp4"
    concat_clips([a.path, b.path], out, ffmpeg=FFMPEG)
    info = probe(out, ffmpeg=FFMPEG)
    assert (info.codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", W, H)
    assert info.fps == FPS and info.frames == 19
    assert abs(info.duration_s - 19 / FPS) <= 1 / FPS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.mp4", "b 'quoted' 镜头.mp4", "episode.mp4"])


def test_wrong_frame_shape_raises_and_leaves_nothing(tmp_path):
    def frames():
        yield from _frames(3, 0)
        yield np.zeros((H, W + 2, 3), np.uint8)

    target = tmp_path / "clip.mp4"
    with pytest.raises(StageError, match=r"frame 3 is \(36, 66, 3\) uint8") as err:
        _encode(frames(), target)
    assert err.value.stage == "encode" and err.value.shot == "sh01"
    assert list(tmp_path.iterdir()) == []


def test_wrong_dtype_is_rejected(tmp_path):
    with pytest.raises(StageError, match="frame 0 is .*float32"):
        _encode([np.zeros((H, W, 3), np.float32)], tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failure_carries_stderr(tmp_path):
    target = tmp_path / "clip.mp4"
    with pytest.raises(StageError) as err:
        _encode(_frames(3, 0), target, preset="not-a-preset")
    assert "not-a-preset" in err.value.stderr
    assert list(tmp_path.iterdir()) == []


def test_odd_size_is_rejected_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match=r"63x36 must be .*even.*yuv420p"):
        encode_clip(_frames(2, 0, (36, 63, 3)), tmp_path / "odd.mp4", width=63, height=36, fps=FPS, ffmpeg=FFMPEG)
    assert list(tmp_path.iterdir()) == []


def test_concat_failure_carries_stderr_and_leaves_nothing(tmp_path):
    with pytest.raises(StageError, match="nothing written") as err:
        concat_clips([tmp_path / "missing.mp4"], tmp_path / "episode.mp4", ffmpeg=FFMPEG)
    assert "missing.mp4" in err.value.stderr
    assert list(tmp_path.iterdir()) == []


def test_srt_times_round_trip_exactly(tmp_path):
    cues = [
        SubtitleCue(index=1, start_s=0.0, end_s=1.5, character="BOB", text="Hello.", shot="sc01-sh01"),
        SubtitleCue(index=2, start_s=1.625, end_s=3.2, character="林小雨", text="你好！\n再见。", shot="sc01-sh02"),
        SubtitleCue(index=3, start_s=3.2, end_s=62.04, character="BOB", text="Bye.", shot="sc01-sh02"),
    ]
    path = tmp_path / "episode.srt"
    write_srt(cues, path)
    parsed = list(srt.parse(path.read_text(encoding="utf-8")))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds(), s.content) for s in parsed] == [
        (c.index, c.start_s, c.end_s, c.text) for c in cues
    ]
    write_srt(cues, path, speaker=True)
    assert list(srt.parse(path.read_text(encoding="utf-8")))[1].content == "林小雨: 你好！\n再见。"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode.srt"]


def test_srt_rejects_inverted_cue(tmp_path):
    with pytest.raises(ValueError, match="cue 7"):
        write_srt([SubtitleCue(index=7, start_s=2, end_s=1, character="A", text="x", shot="s")], tmp_path / "x.srt")


def test_write_png_round_trips_rgb(tmp_path):
    image = next(_frames(1, 3))
    write_png(image, tmp_path / "key.png")
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "key.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, image)
    assert os.listdir(tmp_path) == ["key.png"]
