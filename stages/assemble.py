"""Assembly: join shot clips into the episode, write its subtitles, probe the result.

Clips are joined losslessly with ffmpeg's concat demuxer and ``-c copy``; this relies on
every clip having been encoded with the same codec parameters (see ``stages/encode.py``).
A written dissolve (``Dissolve``) is drawn here, on the cut: its ``frames`` before the cut and
after it blend the two shots (ffmpeg's ``xfade``). A clip has no frames beyond its shot (no
handles), so the outgoing shot's last frame is held under the incoming one's first frames and
the incoming one's first frame under the outgoing one's last: each shot keeps its own timing,
every frame outside the window is the cut's, and the episode keeps its length. Only what the
window needs is encoded again, with the clips' own parameters (``codec``): from the window's
first frame to the incoming clip's next keyframe (its start, in a clip of one GOP); everything
else is still a stream copy.
There is no ffprobe in the shipped ffmpeg, so ``probe`` reads ffmpeg's own stream header
and counts packets with a stream copy to a null muxer (fast: nothing is decoded).
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import srt

from stages.records import StageError, SubtitleCue

VERSION = "3"  # 2: the master carries the mix (AAC) and a soft subtitle track; 3: written dissolves on screen
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


@dataclass(frozen=True)
class Dissolve:
    """A written dissolve on the cut after clip ``after`` (its index): the last ``frames`` of that
    clip and the first ``frames`` of the next blend (``stages.handoffs.dissolve_frames``)."""

    after: int
    frames: int


@dataclass(frozen=True)
class Piece:
    """One entry of the joined episode: ``clip``'s frames ``first`` to ``end`` (exclusive) copied,
    or (``clip`` None) the episode's frames ``first`` to ``end`` encoded again for a dissolve."""

    clip: int | None
    first: int
    end: int


def concat_clips(clips: list[str | Path], out_path: str | Path, *, ffmpeg: str,
                 dissolves: Sequence[Dissolve] = (), fps: int = 0, codec: Sequence[str] = ()) -> None:
    """Join ``clips`` in order into ``out_path``, a stream copy except where ``dissolves`` blend
    two clips: those frames are encoded with ``codec`` (the clips' own ffmpeg output arguments,
    ``stages.encode.codec_args``) at ``fps``, the clips' rate.

    The output appears at ``out_path`` only when ffmpeg succeeded; on failure a StageError
    carries ffmpeg's stderr and nothing is left at or beside ``out_path``.
    """
    if not clips:
        raise ValueError(f"concat_clips: no clips to join into {out_path}")
    if dissolves and (fps <= 0 or not codec):
        raise ValueError(f"concat_clips: dissolves into {out_path} need the clips' fps and codec arguments")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as work:
        # 1. What is copied and what is blended: a copy of each whole clip when nothing dissolves.
        samples = [_samples(c) for c in clips] if dissolves else []
        pieces = join_plan([n for n, _ in samples], [k for _, k in samples], dissolves) if dissolves else [
            Piece(i, 0, -1) for i in range(len(clips))]
        starts = [0]
        for n, _ in samples:
            starts.append(starts[-1] + n)
        # 2. The concat list: absolute paths, single-quoted, with ' written as '\'' (the demuxer's
        #    quoting rule), so spaces, quotes and non-ASCII names survive; a piece of a clip by its
        #    in point (a keyframe), out point (half a frame before its end frame) and duration.
        listing = []
        for k, piece in enumerate(pieces):
            if piece.clip is None:
                path = Path(work) / f"dissolve-{k}.mp4"
                _blend(clips, starts, dissolves, piece, path, fps=fps, codec=codec, ffmpeg=ffmpeg)
                listing.append(_entry(path))
                continue
            listing.append(_entry(clips[piece.clip]))
            n = samples[piece.clip][0] if samples else -1
            if piece.first > 0:
                listing.append(f"inpoint {piece.first / fps:.9f}\n")
            if piece.first > 0 or piece.end < n:
                listing.append(f"outpoint {(piece.end - 0.5) / fps:.9f}\n"
                               f"duration {(piece.end - piece.first) / fps:.9f}\n")
        list_file = os.path.join(work, "clips.txt")
        tmp = os.path.join(work, "episode.mp4")
        Path(list_file).write_text("".join(listing), encoding="utf-8")
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


def join_plan(frames: list[int], keyframes: list[list[int]], dissolves: Sequence[Dissolve]) -> list[Piece]:
    """The episode as pieces (pure): each clip copied from its first keyframe after the window of
    the dissolve into it (its start when none) to the start of the window of the dissolve out of
    it; the rest (each window, and what follows it up to the next copied keyframe) encoded again.
    ``frames``: each clip's frame count; ``keyframes``: each clip's keyframe indices."""
    cuts = {d.after: d.frames for d in dissolves if d.frames > 0}
    for d in dissolves:
        if not 0 <= d.after < len(frames) - 1 or 2 * d.frames > min(frames[d.after], frames[d.after + 1]):
            raise ValueError(f"join_plan: a dissolve of {d.frames} frames each side after clip {d.after} does not "
                             f"fit the clips ({len(frames)} clips, at most half of either shot)")
    pieces, at, start = [], 0, 0  # at: the episode frame the pieces so far reach
    for i, n in enumerate(frames):
        first = next((k for k in keyframes[i] if k >= cuts[i - 1]), n) if i - 1 in cuts else 0
        end = n - cuts.get(i, 0)
        if first < end:
            if start + first > at:
                pieces.append(Piece(None, at, start + first))
            pieces.append(Piece(i, first, end))
            at = start + end
        start += n
    if start > at:
        pieces.append(Piece(None, at, start))
    return pieces


def _entry(path: str | Path) -> str:
    return "file '" + str(Path(path).resolve()).replace("'", "'\\''") + "'\n"


def _blend(clips: list[str | Path], starts: list[int], dissolves: Sequence[Dissolve], piece: Piece, out: Path, *,
           fps: int, codec: Sequence[str], ffmpeg: str) -> None:
    """The episode's frames ``piece.first`` to ``piece.end`` from the clips they fall in, then encoded:
    each clip's own frames as they are, each dissolve's window an ``xfade`` of the outgoing clip's
    last frames (its last frame held past the cut, ``tpad``) and the incoming one's first (its first
    held before it), joined with ``concat``. Only the window's frames leave yuv420p (xfade works in
    4:4:4): the others are the clips' decoded pictures, untouched."""
    cuts = {d.after: d.frames for d in dissolves if d.frames > 0}
    k = max(i for i in range(len(clips)) if starts[i] <= piece.first)
    j = max(i for i in range(len(clips)) if starts[i] < piece.end)
    parts: list[tuple[int, str]] = []  # (input, filter chain) of each segment, in order
    for m in range(k, j + 1):
        n = starts[m + 1] - starts[m]
        lo = piece.first - starts[k] if m == k else (cuts[m - 1] if m - 1 in cuts else 0)
        hi = n - cuts[m] if m < j and m in cuts else (piece.end - starts[j] if m == j else n)
        if lo < hi:
            parts.append((m, f"trim=start_frame={lo}:end_frame={hi},setpts=PTS-STARTPTS"))
        if m < j and m in cuts:
            parts.append((m, f"window{m}"))
    graph, inputs = [], {m: [] for m in range(k, j + 1)}
    for index, (m, _) in enumerate(parts):
        inputs[m].append(index)
        if parts[index][1] == f"window{m}":
            inputs[m + 1].append(index)
    for m, uses in inputs.items():  # each clip decoded once, split to every segment that shows it
        graph.append(f"[{m - k}:v]split={len(uses)}" + "".join(f"[c{m}s{u}]" for u in uses))
    segments = []
    for index, (m, chain) in enumerate(parts):
        if chain != f"window{m}":
            graph.append(f"[c{m}s{index}]{chain}[s{index}]")
        else:
            # xfade from the frame before the window to the one after it: window frame w of 2d is
            # (w + 1) / (2d + 1) the incoming shot; each side padded past what xfade reads
            d, n = cuts[m], starts[m + 1] - starts[m]
            graph.append(f"[c{m}s{index}]trim=start_frame={n - d - 1},setpts=PTS-STARTPTS,"
                         f"tpad=stop_mode=clone:stop={d + 2}[a{index}]")
            graph.append(f"[c{m + 1}s{index}]trim=end_frame={d + 2},setpts=PTS-STARTPTS,"
                         f"tpad=start_mode=clone:start={d + 1}:stop_mode=clone:stop=2[b{index}]")
            graph.append(f"[a{index}][b{index}]xfade=transition=fade:duration={(2 * d + 1) / fps:.9f}:offset=0,"
                         f"trim=start_frame=1:end_frame={2 * d + 1},format=yuv420p,setpts=PTS-STARTPTS[s{index}]")
        segments.append(f"[s{index}]")
    graph.append("".join(segments) + f"concat=n={len(segments)}:v=1:a=0,setpts=N/FRAME_RATE/TB[v]")
    # one thread throughout, as the clips were encoded: the assembly node holds one core
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-filter_complex_threads", "1"]
    for m in range(k, j + 1):
        cmd += ["-threads", "1", "-i", str(clips[m])]
    cmd += ["-filter_complex", ";".join(graph), "-map", "[v]", *codec, str(out)]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise StageError(STAGE, None, f"blending the dissolve at episode frames {piece.first}–{piece.end} failed "
                         f"(ffmpeg exit {result.returncode}); nothing written", result.stderr.decode(errors="replace"),
                         transient=result.returncode < 0)


def _samples(path: str | Path) -> tuple[int, list[int]]:
    """(frames, keyframe indices) of an MP4 clip's first track, from its sample tables (``stsz``,
    ``stss``: no decoding, and only the ``moov`` box is read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def boxes(start: int, end: int):
            pos = start
            while pos + 8 <= end:
                f.seek(pos)
                length, kind = struct.unpack(">I4s", f.read(8))
                head = 8
                if length == 1:
                    length, head = struct.unpack(">Q", f.read(8))[0], 16
                elif length == 0:
                    length = end - pos
                if length < head:
                    break
                yield kind, pos + head, pos + length
                pos += length

        def child(start: int, end: int, *path: bytes) -> tuple[int, int] | None:
            for name in path:
                start, end = next(((a, b) for kind, a, b in boxes(start, end) if kind == name), (None, None))
                if start is None:
                    return None
            return start, end

        stbl = child(0, size, b"moov", b"trak", b"mdia", b"minf", b"stbl")
        stsz = stbl and child(*stbl, b"stsz")
        if not stsz:
            raise StageError(STAGE, None, f"{path}: not an MP4 clip with a sample table (no moov/…/stsz box)")
        f.seek(stsz[0] + 8)
        (frames,) = struct.unpack(">I", f.read(4))
        stss = child(*stbl, b"stss")
        if not stss:  # every sample a keyframe
            return frames, list(range(frames))
        f.seek(stss[0] + 4)
        (count,) = struct.unpack(">I", f.read(4))
        return frames, [k - 1 for k in struct.unpack(f">{count}I", f.read(4 * count))]


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
