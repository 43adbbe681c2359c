"""Hand-offs stage: the cut as editors open it — an OpenTimelineIO timeline, FCP 7 XML (Premiere,
Resolve) and a 剪映 (JianYing) draft, each pointing at every shot's own clip.

Inputs are plain records: each shot where it sits (``TimelineClip``, with the file name of its
own clip), the subtitle cues, and the audio stems (``AudioStem``: dialogue, music — the mix is
left out, it is those two together), all files in one folder (``media_dir``).

* ``timeline.otio``: one video track, a clip per shot on its own file (a dissolve the script
  writes is an OTIO ``Transition``), one audio track per stem, every subtitle cue a marker on
  its shot's clip (OTIO has no text track; markers are what its adapters carry).
* ``timeline.xml``: the same timeline through the OTIO FCP 7 XML adapter (``otio-fcp-adapter``),
  which Premiere Pro and DaVinci Resolve import.
* ``<title>.zip``: a 剪映 draft folder written with ``pyJianYingDraft`` 0.3.x — ``draft_info.json``
  (JianYing 6 and later) and the same content as ``draft_content.json`` (earlier versions, and
  what pyJianYingDraft itself loads), ``draft_meta_info.json``, the media copied into its
  ``assets/`` folder; the shots on the video track, the dialogue and music on audio tracks,
  each cue a text segment on the subtitle track (a second one where cues overlap). Material
  paths name the copies through JianYing's draft-folder placeholder
  (``DRAFT_PATH_PLACEHOLDER/assets/…``), or, with ``draft_root`` (the editor's
  JianYing drafts folder), as absolute paths under it, as peers export them.

Writes are atomic: each file appears complete or not at all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

from stages.records import AudioStem, Record, StageError, SubtitleCue

VERSION = "2"  # 2: a dissolve's length from dissolve_frames, the same in every hand-off and on screen
STAGE = "handoffs"
AUDIO_STEMS = ("dialogue", "music")  # what editors get on audio tracks; "mix" is these two together
SMPTE_RATES = (24, 25, 30, 48, 50, 60)  # whole-frame rates OpenTimelineIO writes SMPTE timecode for
DRAFT_INFO, DRAFT_CONTENT, DRAFT_META = "draft_info.json", "draft_content.json", "draft_meta_info.json"
JIANYING_TRACKS = {"video": "镜头", "dialogue": "对白", "music": "音乐", "subtitles": "字幕"}
# JianYing's token for "this draft's own folder" in material paths: one literal, the same in every
# draft (the editor itself writes it for media saved inside a draft; other ids are not resolved)
DRAFT_PATH_PLACEHOLDER = "##_draftpath_placeholder_0E685133-18CE-45ED-8CB8-2904A212EC80_##"


class TimelineClip(Record):
    """One shot as the editorial timeline shows it: where it sits in the episode, what it is, and
    its own clip (``media``: a file name in the hand-off's media folder)."""

    id: str
    start_frame: int
    frames: int
    camera: str
    scene: str
    action: str
    characters: list[str]
    keyframes: int
    content_key: str = ""
    media: str = ""
    transition_out: str | None = None


def is_dissolve(text: str | None) -> bool:
    """A written transition that blends two shots (``DISSOLVE TO:``, 叠化): an editor's transition."""
    return bool(text) and bool(re.search(r"DISSOLVE|叠化|溶解|オーバーラップ", text, re.I))


def dissolve_frames(before: int, after: int, fps: int) -> int:
    """Frames on each side of the cut that a written dissolve blends, between a shot of ``before``
    frames and one of ``after``: half a second centred on the cut, at most half of either shot
    (so a shot's dissolves in and out never meet); 0 where a shot is too short (the cut stays).
    The one rule for the hand-offs' transitions and the episode's picture (``cut_dissolves``)."""
    return max(0, min(round(fps / 4), before // 2, after // 2))


def cut_dissolves(frames: list[int], transitions_out: list[str | None], fps: int) -> dict[int, int]:
    """Each cut a written dissolve blends, for shots of ``frames`` with ``transitions_out`` written
    after them: the index of the shot before the cut → ``dissolve_frames``."""
    out = {}
    for k, (text, a, b) in enumerate(zip(transitions_out, frames, frames[1:])):
        if is_dissolve(text) and (half := dissolve_frames(a, b, fps)):
            out[k] = half
    return out


# --------------------------------------------------------------------------- OpenTimelineIO


def build_timeline(shots: list[TimelineClip], cues: list[SubtitleCue], *, title: str, fps: int,
                   stems: list[AudioStem] = (), timebase: int | None = None):
    """The cut as an ``opentimelineio.schema.Timeline``: per-shot media, audio tracks, cue markers.
    ``timebase``: the rate its times are written in (default ``fps``; see ``fcp_timebase``)."""
    import opentimelineio as otio

    rate = timebase or fps

    def frames(n: float):
        return otio.opentime.RationalTime(round(n * rate / fps), rate)

    timeline = otio.schema.Timeline(name=title)
    track = otio.schema.Track(name="picture", kind=otio.schema.TrackKind.Video)
    timeline.tracks.append(track)
    dissolves = cut_dissolves([s.frames for s in shots], [s.transition_out for s in shots], fps)
    cues_by_shot: dict[str, list[SubtitleCue]] = {}
    for cue in cues:
        cues_by_shot.setdefault(cue.shot, []).append(cue)
    for k, shot in enumerate(shots):
        if not shot.media:
            raise ValueError(f"build_timeline: shot {shot.id} names no clip file (TimelineClip.media)")
        # 1. The shot on its own clip, the whole clip.
        clip = otio.schema.Clip(
            name=shot.id,
            media_reference=otio.schema.ExternalReference(
                target_url=shot.media, available_range=otio.opentime.TimeRange(frames(0), frames(shot.frames))),
            source_range=otio.opentime.TimeRange(frames(0), frames(shot.frames)))
        clip.metadata["anim"] = {"camera": shot.camera, "scene": shot.scene, "action": shot.action,
                                 "characters": list(shot.characters), "keyframes": shot.keyframes,
                                 "content_key": shot.content_key, "episode_start_frame": shot.start_frame}
        # 2. Each cue a marker on its shot, in the clip's own frames.
        for cue in cues_by_shot.get(shot.id, []):
            start = max(0, round(cue.start_s * fps) - shot.start_frame)
            length = max(1, round((cue.end_s - cue.start_s) * fps))
            marker = otio.schema.Marker(name=f"{cue.character}: {cue.text}",
                                        marked_range=otio.opentime.TimeRange(frames(start), frames(length)))
            marker.metadata["anim"] = {"subtitle": cue.model_dump(mode="json")}
            clip.markers.append(marker)
        track.append(clip)
        # 3. A written dissolve into the next shot, centred on the cut (half a second, at most half of either).
        if k in dissolves:
            half = dissolves[k]
            track.append(otio.schema.Transition(name=shot.transition_out,
                                                transition_type=otio.schema.TransitionTypes.SMPTE_Dissolve,
                                                in_offset=frames(half), out_offset=frames(half)))
    # 4. One audio track per stem, the stem placed at its start.
    for stem in stems:
        if stem.name not in AUDIO_STEMS:
            continue
        audio = otio.schema.Track(name=stem.name, kind=otio.schema.TrackKind.Audio)
        start, length = round(stem.start_s * fps), max(1, round(stem.duration_s * fps))
        if start > 0:
            audio.append(otio.schema.Gap(source_range=otio.opentime.TimeRange(frames(0), frames(start))))
        audio.append(otio.schema.Clip(
            name=stem.name,
            media_reference=otio.schema.ExternalReference(
                target_url=stem.path, available_range=otio.opentime.TimeRange(frames(0), frames(length))),
            source_range=otio.opentime.TimeRange(frames(0), frames(length))))
        timeline.tracks.append(audio)
    return timeline


def write_timeline(shots: list[TimelineClip], cues: list[SubtitleCue], path: str | Path, *, title: str, fps: int,
                   stems: list[AudioStem] = ()) -> None:
    """The editorial hand-off as OTIO JSON (``timeline.otio``); media paths relative to it."""
    import opentimelineio as otio

    timeline = build_timeline(shots, cues, title=title, fps=fps, stems=stems)
    _write_atomic(Path(path), otio.adapters.write_to_string(timeline, "otio_json").encode("utf-8"))


def write_fcp_xml(shots: list[TimelineClip], cues: list[SubtitleCue], path: str | Path, *, title: str, fps: int,
                  stems: list[AudioStem] = ()) -> None:
    """The same timeline as Final Cut Pro 7 XML (``timeline.xml``) through the OTIO FCP adapter,
    for Premiere Pro and DaVinci Resolve; media paths relative to it."""
    import opentimelineio as otio

    if "fcp_xml" not in otio.adapters.available_adapter_names():
        raise StageError(STAGE, None, "the OpenTimelineIO FCP 7 XML adapter is not installed (package "
                                      "'otio-fcp-adapter'); install the project's dependencies")
    timeline = build_timeline(shots, cues, title=title, fps=fps, stems=stems, timebase=fcp_timebase(fps))
    _write_atomic(Path(path), otio.adapters.write_to_string(timeline, "fcp_xml").encode("utf-8"))


def fcp_timebase(fps: int) -> int:
    """The sequence rate FCP 7 XML is written in: its timecode needs a SMPTE rate, so an episode at
    a rate without one (12 fps, 8, 15) is laid on the smallest SMPTE rate that is a whole multiple
    of it (24, 30 …: every frame lands on a frame), else the smallest one above it (times rounded)."""
    if fps in SMPTE_RATES:
        return fps
    return next((r for r in SMPTE_RATES if r % fps == 0), next((r for r in SMPTE_RATES if r > fps), SMPTE_RATES[-1]))


# --------------------------------------------------------------------------- 剪映 (JianYing)


def draft_name(title: str) -> str:
    """A folder name JianYing accepts on Windows and macOS: the title less ``\\ / : * ? " < > |``."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", title).strip(" ._")
    return name[:80] or "episode"


def write_jianying_draft(shots: list[TimelineClip], cues: list[SubtitleCue], zip_path: str | Path, *,
                         media_dir: str | Path, title: str, width: int, height: int, fps: int,
                         stems: list[AudioStem] = (), draft_root: str | None = None) -> str:
    """A zipped 剪映 draft of the cut (see the module docstring); returns the draft's folder name
    (the zip's single top-level folder). ``media_dir`` holds every shot's ``media`` and every
    stem's ``path``. Raises StageError naming the file pyJianYingDraft could not read."""
    import pyJianYingDraft as jy

    media_dir, zip_path = Path(media_dir), Path(zip_path)
    name = draft_name(title)
    with tempfile.TemporaryDirectory(prefix=f".{zip_path.name}.", dir=zip_path.parent) as work:
        # 1. The draft folder, its media copied in.
        folder = jy.DraftFolder(work)
        script = folder.create_draft(name, width, height, fps)
        draft_dir = Path(work) / name
        assets = draft_dir / "assets"
        assets.mkdir()
        placed = {f: _copy_in(media_dir / f, assets) for f in
                  [s.media for s in shots] + [s.path for s in stems if s.name in AUDIO_STEMS]}
        # 2. The shots, end to end, on the video track.
        video = script.append_track(jy.TrackSpec(jy.TrackType.video, JIANYING_TRACKS["video"]))
        segments = []
        for shot in shots:
            material = _material(jy.VideoMaterial, placed[shot.media], shot.id)
            start, end = _us(shot.start_frame, fps), _us(shot.start_frame + shot.frames, fps)
            segment = jy.VideoSegment(material, jy.Timerange(start, min(end - start, material.duration)))
            segments.append(segment)
        # A dissolve hangs on the segment before the cut, centred on it.
        for k, half in cut_dissolves([s.frames for s in shots], [s.transition_out for s in shots], fps).items():
            segments[k].add_transition(jy.TransitionType.叠化, duration=_us(2 * half, fps))
        for segment in segments:
            script.add_segment(segment, video)
        # 3. Dialogue and music on audio tracks of their own.
        for stem in stems:
            if stem.name not in AUDIO_STEMS:
                continue
            material = _material(jy.AudioMaterial, placed[stem.path], stem.name)
            track = script.append_track(jy.TrackSpec(jy.TrackType.audio, JIANYING_TRACKS[stem.name]))
            start = round(stem.start_s * 1_000_000)
            script.add_segment(jy.AudioSegment(material, jy.Timerange(
                start, min(round(stem.duration_s * 1_000_000), material.duration))), track)
        # 4. Every cue a text segment: bold, centred, edged, low in the frame (inside the 9:16 safe area).
        _subtitles(jy, script, cues, portrait=height > width)
        # 5. The content as JianYing 6+ and earlier read it; media paths made portable; the meta file.
        draft_id = str(uuid.uuid4()).upper()
        script.content["id"] = draft_id
        content = json.loads(script.dumps())
        prefix = f"{draft_root.rstrip('/')}/{name}/assets" if draft_root else f"{DRAFT_PATH_PLACEHOLDER}/assets"
        content = _replace_prefix(content, str(assets), prefix)
        text = json.dumps(content, ensure_ascii=False, indent=2)
        for file in (DRAFT_INFO, DRAFT_CONTENT):
            (draft_dir / file).write_text(text, encoding="utf-8")
        meta = json.loads((draft_dir / DRAFT_META).read_text(encoding="utf-8"))
        meta.update(draft_id=draft_id, draft_name=name, tm_duration=script.duration,
                    draft_fold_path=f"{draft_root.rstrip('/')}/{name}" if draft_root else "",
                    draft_root_path=draft_root or "")
        (draft_dir / DRAFT_META).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
        # 6. Zipped: one folder, media stored as they are (already compressed), JSON deflated.
        tmp = Path(work) / "draft.zip"
        with zipfile.ZipFile(tmp, "w") as zf:
            for file in sorted(draft_dir.rglob("*")):
                if file.is_file():
                    kind = zipfile.ZIP_DEFLATED if file.suffix == ".json" else zipfile.ZIP_STORED
                    zf.write(file, f"{name}/{file.relative_to(draft_dir).as_posix()}", compress_type=kind)
        os.chmod(tmp, 0o644)
        os.replace(tmp, zip_path)
    return name


def _subtitles(jy, script, cues: list[SubtitleCue], *, portrait: bool) -> None:
    style = jy.TextStyle(size=9.0 if portrait else 6.0, bold=True, align=1, auto_wrapping=True,
                         max_line_width=0.76 if portrait else 0.8)
    border = jy.TextBorder(color=(0.0, 0.0, 0.0), width=30.0)
    place = jy.ClipSettings(transform_y=-0.4 if portrait else -0.8)
    tracks: list[tuple[Any, list[tuple[int, int]]]] = []
    for cue in cues:
        start, end = round(cue.start_s * 1_000_000), round(cue.end_s * 1_000_000)
        home = next((t for t in tracks if all(end <= a or start >= b for a, b in t[1])), None)
        if home is None:  # simultaneous lines (dual dialogue) stack on a second subtitle track
            label = JIANYING_TRACKS["subtitles"] + (f" {len(tracks) + 1}" if tracks else "")
            home = (script.append_track(jy.TrackSpec(jy.TrackType.text, label)), [])
            tracks.append(home)
        home[1].append((start, end))
        script.add_segment(jy.TextSegment(cue.text, jy.Timerange(start, end - start), style=style, border=border,
                                          clip_settings=place), home[0])


def _us(frame: int, fps: int) -> int:
    return round(frame * 1_000_000 / fps)


def _copy_in(src: Path, assets: Path) -> Path:
    if not src.is_file():
        raise StageError(STAGE, None, f"剪映 draft: media file {src} is missing; nothing written")
    dst = assets / src.name
    shutil.copyfile(src, dst)
    return dst


def _material(kind, path: Path, what: str):
    try:
        return kind(str(path))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise StageError(STAGE, None, f"剪映 draft: pyJianYingDraft cannot read {path.name} ({what}): {exc}; "
                                      "nothing written") from None


def _replace_prefix(data: Any, old: str, new: str) -> Any:
    if isinstance(data, str):
        return new + data[len(old):] if data.startswith(old) else data
    if isinstance(data, dict):
        return {k: _replace_prefix(v, old, new) for k, v in data.items()}
    if isinstance(data, list):
        return [_replace_prefix(v, old, new) for v in data]
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
