"""Assembly: join shot clips into the episode, write its subtitles, probe the result.

Clips are joined losslessly with ffmpeg's concat demuxer and ``-c copy``; this relies on
every clip having been encoded with the same codec parameters (see ``stages/encode.py``).
There is no ffprobe in the shipped ffmpeg, so ``probe`` reads ffmpeg's own stream header
and counts packets with a stream copy to a null muxer (fast: nothing is decoded).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import srt

from stages.records import StageError, SubtitleCue

VERSION = "2"  # 2: the master carries the mix (AAC) and a soft subtitle track
STAGE = "assemble"


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds: its first video stream and the container's duration."""

    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    codec: str
    pix_fmt: str


def concat_clips(clips: list[str | Path], out_path: str | Path, *, ffmpeg: str) -> None:
    """Join ``clips`` in order into ``out_path`` without re-encoding.

    The output appears at ``out_path`` only when ffmpeg succeeded; on failure a StageError
    carries ffmpeg's stderr and nothing is left at or beside ``out_path``.
    """
    if not clips:
        raise ValueError(f"concat_clips: no clips to join into {out_path}")
    out_path = Path(out_path)
    # 1. The concat list: absolute paths, single-quoted, with ' written as '\'' (the demuxer's
    #    quoting rule), so spaces, quotes and non-ASCII names survive.
    listing = "".join(
        "file '" + str(Path(c).resolve()).replace("'", "'\\''") + "'\n" for c in clips
    )
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as work:
        list_file = os.path.join(work, "clips.txt")
        tmp = os.path.join(work, "episode.mp4")
        Path(list_file).write_text(listing, encoding="utf-8")
        # 2. Stream copy into a temporary file in the same directory, then move it into place.
        cmd = [
            ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "concat", "-safe", "0", "-i", list_file,
            "-map", "0", "-c", "copy", "-movflags", "+faststart", "-f", "mp4", tmp,
        ]
        result = subprocess.run(cmd, capture_output=True)
        if result.returncode != 0:
            raise StageError(
                STAGE, None,
                f"concatenating {len(clips)} clips into {out_path} failed (ffmpeg exit "
                f"{result.returncode}); nothing written",
                result.stderr.decode(errors="replace"),
            )
        os.replace(tmp, out_path)


def mux(video: str | Path, audio: str | Path, srt_file: str | Path | None, out_path: str | Path, *, ffmpeg: str,
        language: str = "eng") -> None:
    """The master: ``video``'s stream and ``audio``'s copied, the SRT as a soft subtitle track
    (mov_text, tagged ``language``, ISO 639-2), faststart. Appears only when ffmpeg succeeded."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.stem}.part.mp4")
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-i", str(audio)]
    if srt_file is not None:
        cmd += ["-i", str(srt_file)]
    cmd += ["-map", "0:v:0", "-map", "1:a:0"] + (["-map", "2:s:0"] if srt_file is not None else [])
    cmd += ["-c:v", "copy", "-c:a", "copy"]
    if srt_file is not None:
        cmd += ["-c:s", "mov_text", "-metadata:s:s:0", f"language={language}"]
    cmd += ["-metadata:s:a:0", f"language={language}", "-movflags", "+faststart", "-f", "mp4", str(tmp)]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StageError(STAGE, None, f"muxing picture, sound and subtitles into {out_path.name} failed (ffmpeg "
                         f"exit {result.returncode}); nothing written", result.stderr.decode(errors="replace"),
                         transient=result.returncode < 0)
    os.replace(tmp, out_path)


def write_srt(cues: list[SubtitleCue], path: str | Path, *, speaker: bool = False) -> None:
    """Write ``cues`` as an SRT file, in the given order, keeping each cue's index.

    A subtitle shows only the spoken text, as broadcast subtitles do. With ``speaker=True``
    every cue is prefixed ``NAME: `` (useful for hard-of-hearing subtitles or radio-play
    style episodes). Times are written to the millisecond, the SRT resolution.
    """
    subs = []
    for cue in cues:
        if cue.start_s < 0 or cue.end_s <= cue.start_s:
            raise ValueError(
                f"subtitle cue {cue.index} (shot {cue.shot}): times {cue.start_s}–{cue.end_s} s "
                "must satisfy 0 <= start < end"
            )
        content = f"{cue.character}: {cue.text}" if speaker else cue.text
        subs.append(
            srt.Subtitle(
                index=cue.index,
                start=timedelta(milliseconds=round(cue.start_s * 1000)),
                end=timedelta(milliseconds=round(cue.end_s * 1000)),
                content=content,
            )
        )
    _write_atomic(Path(path), srt.compose(subs, reindex=False).encode("utf-8"))


def write_png(image: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 image (height, width, 3) as a PNG, atomically."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"write_png {path}: expected an RGB uint8 (height, width, 3) image, got {got}")
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise StageError(STAGE, None, f"OpenCV could not encode {path} as PNG; nothing written")
    _write_atomic(Path(path), data.tobytes())


_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_SIZE = re.compile(r"^(\d+)x(\d+)")
_FPS = re.compile(r"([\d.]+)(k?) (fps|tbr)")


def probe(path: str | Path, *, ffmpeg: str) -> VideoInfo:
    """Describe the first video stream of ``path`` using only the ffmpeg binary.

    ``frames`` counts the stream's packets (one per frame for H.264 in MP4); ``duration_s``
    is the container duration from the header (10 ms resolution).
    """
    cmd = [
        ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
        "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-",
    ]
    result = subprocess.run(cmd, capture_output=True)
    err = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        raise StageError(STAGE, None, f"cannot read video {path} (ffmpeg exit {result.returncode})", err)
    try:
        # 1. The first video stream's line, split on top-level commas:
        #    "h264 (High) (avc1 / …)", "yuv420p(progressive)", "64x36 [SAR 1:1 DAR 16:9]", …, "24 fps", …
        line = next(x for x in err.splitlines() if "Stream #" in x and "Video: " in x)
        parts = _split_top_level(line.split("Video: ", 1)[1])
        codec = parts[0].split(" ", 1)[0]
        pix_fmt = parts[1].split("(", 1)[0].strip()
        width, height = next(map(int, m.groups()) for p in parts if (m := _SIZE.match(p)))
        rates = {unit: float(v) * (1000 if k else 1) for v, k, unit in _FPS.findall(line)}
        fps = rates.get("fps", rates.get("tbr", 0.0))
        h, m, s = _DURATION.search(err).groups()
        duration = int(h) * 3600 + int(m) * 60 + float(s)
        # 2. Packets counted by the stream copy; -progress reports the final count last.
        frames = int(re.findall(r"^frame=(\d+)", result.stdout.decode(errors="replace"), re.M)[-1])
    except (StopIteration, AttributeError, IndexError, ValueError) as exc:
        raise StageError(STAGE, None, f"cannot parse ffmpeg's description of {path}: {exc!r}", err) from None
    return VideoInfo(width, height, fps, frames, duration, codec, pix_fmt)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the artifact private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
