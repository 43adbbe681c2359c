"""Encoding: stream one shot's RGB frames through ffmpeg into an H.264 clip.

Frames are piped raw (rgb24) to ffmpeg's stdin as they are produced, so a shot is never
held in memory or written out as PNGs. Every clip of an episode is encoded with the same
codec parameters — H.264 High, yuv420p, no B-frames, closed GOPs, a fixed track timescale
of ``fps * 512`` — so the assemble stage can join them with the concat demuxer and
``-c copy``, and the episode lasts exactly total frames / fps.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg as ffmpeg_lib
import numpy as np

from stages.records import StageError

VERSION = "1"
STAGE = "encode"


@dataclass(frozen=True)
class Clip:
    """An encoded shot clip."""

    path: str
    frames: int
    width: int
    height: int
    fps: int


def codec_options(*, fps: int, crf: int, preset: str, threads: int = 1) -> dict[str, Any]:
    """The output options every clip is encoded with (ffmpeg's names): what lets clips of one
    episode join with a stream copy. Whatever is encoded between them in the episode (the frames
    of a dissolve, ``stages.assemble``) uses the same, through ``codec_args``."""
    return {"format": "mp4", "vcodec": "libx264", "pix_fmt": "yuv420p", "profile": "high", "crf": crf,
            "preset": preset, "r": fps,
            "bf": 0,  # no B-frames: no composition offsets, no edit lists, exact concat durations
            "threads": threads, "movflags": "+faststart", "video_track_timescale": fps * 512,
            "x264-params": "open-gop=0"}


def codec_args(*, fps: int, crf: int, preset: str, threads: int = 1) -> list[str]:
    """``codec_options`` as ffmpeg output arguments, in the order ffmpeg-python writes them."""
    options = codec_options(fps=fps, crf=crf, preset=preset, threads=threads)
    muxer = options.pop("format")  # ffmpeg-python writes it first, as -f
    return ["-f", muxer] + [a for k in sorted(options) for a in (f"-{k}", str(options[k]))]


def encode_clip(
    frames: Iterable[np.ndarray],
    path: str | Path,
    *,
    width: int,
    height: int,
    fps: int,
    crf: int = 23,
    preset: str = "veryfast",
    threads: int = 1,
    ffmpeg: str,
    shot: str | None = None,
) -> Clip:
    """Encode ``frames`` (RGB uint8, shape (height, width, 3)) to an H.264 MP4 at ``path``.

    The clip is written to a temporary file beside ``path`` and moved into place only when
    ffmpeg succeeded; on any failure nothing is left at ``path`` or beside it.

    Raises:
        ValueError: odd ``width``/``height`` (yuv420p stores chroma at half resolution),
            or a non-positive size, fps or thread count.
        StageError: a frame of the wrong shape or dtype (named by index), no frames at all,
            or ffmpeg failing (its stderr attached); ``transient`` when a signal killed ffmpeg
            (the same frames encoded again may succeed), not when ffmpeg exited with an error.
    """
    # 1. Check the arguments before starting a process.
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(
            f"encode: frame size {width}x{height} must be positive and even on both sides "
            "(H.264 yuv420p stores chroma at half resolution)"
        )
    if fps <= 0 or threads <= 0:
        raise ValueError(f"encode: fps={fps} and threads={threads} must be positive")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part.mp4", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # ffmpeg reuses the file; mkstemp's 0600 would make the clip private

    # 2. Start ffmpeg reading raw frames from a pipe; drain stderr in a thread so ffmpeg
    #    never blocks on a full stderr pipe while we block on its stdin.
    stream = ffmpeg_lib.input(
        "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps
    ).output(tmp, **codec_options(fps=fps, crf=crf, preset=preset, threads=threads)
    ).global_args("-hide_banner", "-nostats", "-loglevel", "error")
    proc = stream.overwrite_output().run_async(cmd=ffmpeg, pipe_stdin=True, pipe_stderr=True)
    stderr_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()

    def fail(problem: str, *, exited: bool = False) -> StageError:
        # ``exited``: ffmpeg stopped reading on its own; how it ended says whether the failure is
        # about the input (it exited with an error) or not (a signal killed it: transient).
        returncode = None
        if exited:
            try:
                returncode = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait()
        drain.join()
        _remove(tmp)
        killed = returncode is not None and returncode < 0
        if killed:
            problem += f" (the encoder was killed by signal {-returncode})"
        return StageError(STAGE, shot, problem, b"".join(stderr_chunks).decode(errors="replace"), transient=killed)

    # 3. Stream the frames, checking each one. Any failure, including one raised by the
    #    frame generator itself, kills ffmpeg and removes the temporary file.
    count = 0
    expected = (height, width, 3)
    try:
        for frame in frames:
            if not isinstance(frame, np.ndarray) or frame.shape != expected or frame.dtype != np.uint8:
                got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
                raise fail(f"frame {count} is {got}, expected RGB uint8 {expected}; nothing written to {path}")
            proc.stdin.write(np.ascontiguousarray(frame).data)
            count += 1
        proc.stdin.close()
    except StageError:
        raise
    except BrokenPipeError:
        raise fail(f"ffmpeg stopped reading at frame {count}; nothing written to {path}", exited=True) from None
    except BaseException:
        fail(f"interrupted at frame {count}")
        raise
    if count == 0:
        raise fail(f"no frames to encode; nothing written to {path}")

    # 4. Wait for ffmpeg, then move the finished clip into place.
    returncode = proc.wait()
    drain.join()
    if returncode != 0:
        _remove(tmp)
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
        raise StageError(
            STAGE, shot, f"ffmpeg {how}; nothing written to {path}",
            b"".join(stderr_chunks).decode(errors="replace"), transient=returncode < 0,
        )
    os.replace(tmp, path)
    return Clip(path=str(path), frames=count, width=width, height=height, fps=fps)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
