"""Editorial hand-offs (#14.6) on real files: shot clips encoded by ffmpeg, WAV stems made by
ffmpeg (sines), read back by the tools editors' software rests on — OpenTimelineIO, its FCP 7
XML adapter, and pyJianYingDraft loading the 剪映 draft it would hand to JianYing."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import imageio_ffmpeg
import opentimelineio as otio
import pyJianYingDraft as jy
import pytest

from stages import handoffs
from stages.handoffs import TimelineClip
from stages.records import AudioStem, StageError, SubtitleCue

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FPS = 24
FRAMES = [36, 24, 48]  # 1.5 s, 1 s, 2 s


def _run(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, list[TimelineClip], list[SubtitleCue], list[AudioStem]]:
    d = tmp_path_factory.mktemp("handoff-media")
    shots, start = [], 0
    for k, n in enumerate(FRAMES):
        name = f"shot-sc01-sh{k + 1:02d}.mp4"
        _run("-f", "lavfi", "-i", f"testsrc=size=64x112:rate={FPS}", "-frames:v", str(n),
             "-c:v", "libx264", "-pix_fmt", "yuv420p", str(d / name))
        shots.append(TimelineClip(id=f"sc01-sh{k + 1:02d}", start_frame=start, frames=n, camera="medium",
                                  scene="INT. CAFE - NIGHT", action="", characters=["MIO", "KAI"], keyframes=2,
                                  media=name, transition_out="DISSOLVE TO:" if k == 0 else None))
        start += n
    total = start / FPS
    _run("-f", "lavfi", "-i", f"sine=frequency=220:duration={total}:sample_rate=48000", "-ac", "1",
         str(d / "dialogue.wav"))
    _run("-f", "lavfi", "-i", "sine=frequency=440:duration=3:sample_rate=48000", "-ac", "2", str(d / "music.wav"))
    stems = [AudioStem(name="dialogue", path="dialogue.wav", duration_s=total),
             AudioStem(name="music", path="music.wav", start_s=1.0, duration_s=3.0)]
    cues = [SubtitleCue(index=1, start_s=0.2, end_s=1.3, character="MIO", text="你回来了。", shot="sc01-sh01"),
            SubtitleCue(index=2, start_s=1.6, end_s=2.4, character="KAI", text="I never left.", shot="sc01-sh02"),
            SubtitleCue(index=3, start_s=2.6, end_s=4.2, character="MIO", text="Then stay.", shot="sc01-sh03"),
            SubtitleCue(index=4, start_s=2.8, end_s=3.6, character="KAI", text="(at once) I will.", shot="sc01-sh03")]
    return d, shots, cues, stems


def test_otio_timeline_has_per_shot_media_audio_tracks_and_subtitle_markers(media):
    d, shots, cues, stems = media
    handoffs.write_timeline(shots, cues, d / "timeline.otio", title="Cafe", fps=FPS, stems=stems)
    timeline = otio.adapters.read_from_file(str(d / "timeline.otio"))
    video = [t for t in timeline.tracks if t.kind == otio.schema.TrackKind.Video]
    audio = {t.name: t for t in timeline.tracks if t.kind == otio.schema.TrackKind.Audio}
    assert len(video) == 1 and set(audio) == {"dialogue", "music"}
    clips = list(video[0].find_clips())
    assert [c.media_reference.target_url for c in clips] == [s.media for s in shots]  # each shot its own file
    assert all((d / c.media_reference.target_url).is_file() for c in clips)
    assert [c.source_range.start_time.value for c in clips] == [0, 0, 0]
    assert [c.source_range.duration.value for c in clips] == FRAMES
    assert timeline.duration().value == sum(FRAMES)
    # the written dissolve is a transition on the cut between the first two shots
    transitions = [t for t in video[0] if isinstance(t, otio.schema.Transition)]
    assert len(transitions) == 1 and transitions[0].transition_type == otio.schema.TransitionTypes.SMPTE_Dissolve
    # the music bed starts at 1 s: a gap, then the stem
    music = list(audio["music"])
    assert isinstance(music[0], otio.schema.Gap) and music[0].duration().value == FPS
    assert music[1].media_reference.target_url == "music.wav" and music[1].duration().value == 3 * FPS
    # every cue a marker on its own shot, in that clip's frames
    markers = [(c.name, m) for c in clips for m in c.markers]
    assert [m.metadata["anim"]["subtitle"]["text"] for _, m in markers] == [c.text for c in cues]
    shot3 = next(m for name, m in markers if name == "sc01-sh03")
    assert shot3.marked_range.start_time.value == round(2.6 * FPS) - 60


def test_fcp_xml_round_trips_through_otio(media):
    d, shots, cues, stems = media
    handoffs.write_fcp_xml(shots, cues, d / "timeline.xml", title="Cafe", fps=FPS, stems=stems)
    text = (d / "timeline.xml").read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<xmeml" in text
    back = otio.adapters.read_from_file(str(d / "timeline.xml"), adapter_name="fcp_xml")
    video = [t for t in back.tracks if t.kind == otio.schema.TrackKind.Video]
    audio = [t for t in back.tracks if t.kind == otio.schema.TrackKind.Audio]
    clips = list(video[0].find_clips())
    assert [c.name for c in clips] == [s.id for s in shots]
    assert [c.source_range.duration.value for c in clips] == FRAMES
    assert [Path(c.media_reference.target_url).name for c in clips] == [s.media for s in shots]
    assert len(audio) == 2
    assert sum(len(c.markers) for c in clips) == len(cues)
    assert back.duration().rescaled_to(FPS).value == sum(FRAMES)


@pytest.mark.parametrize("fps, timebase", [(12, 24), (8, 24), (15, 30), (7, 24)])
def test_fcp_xml_at_a_rate_without_smpte_timecode_keeps_every_shot_in_seconds(media, fps, timebase):
    """FCP 7 XML timecode needs a SMPTE rate: a 12 fps episode (the tiny diffusers profile) is laid
    on a 24 fps sequence, each shot as long in seconds as in the episode."""
    d, shots, cues, stems = media
    handoffs.write_fcp_xml(shots, cues, d / "timeline.xml", title="Cafe", fps=fps, stems=stems)
    back = otio.adapters.read_from_file(str(d / "timeline.xml"), adapter_name="fcp_xml")
    clips = list(back.video_tracks()[0].find_clips())
    assert {c.source_range.duration.rate for c in clips} == {timebase}
    assert [round(c.source_range.duration.to_seconds() * fps) for c in clips] == FRAMES


def test_jianying_draft_reloads_with_pyjianyingdraft(media, tmp_path):
    d, shots, cues, stems = media
    zip_path = tmp_path / "cafe_jianying.zip"
    name = handoffs.write_jianying_draft(shots, cues, zip_path, media_dir=d, title="咖啡馆: 第1集", width=64,
                                         height=112, fps=FPS, stems=stems)
    assert name == "咖啡馆_ 第1集"
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {name}
        zf.extractall(tmp_path / "drafts")
    draft = tmp_path / "drafts" / name
    # 1. JianYing 6+ reads draft_info.json; earlier versions (and pyJianYingDraft) draft_content.json.
    info = json.loads((draft / "draft_info.json").read_text(encoding="utf-8"))
    assert info == json.loads((draft / "draft_content.json").read_text(encoding="utf-8"))
    assert info["canvas_config"]["width"] == 64 and info["canvas_config"]["height"] == 112
    meta = json.loads((draft / "draft_meta_info.json").read_text(encoding="utf-8"))
    assert meta["draft_id"] == info["id"] and meta["draft_name"] == name
    # 2. The media are inside the draft folder, named through the draft-folder placeholder.
    placeholder = f"{handoffs.DRAFT_PATH_PLACEHOLDER}/assets/"
    paths = [m["path"] for m in info["materials"]["videos"] + info["materials"]["audios"]]
    assert len(paths) == 5 and all(p.startswith(placeholder) for p in paths)
    assert all((draft / "assets" / p[len(placeholder):]).is_file() for p in paths)
    # 3. pyJianYingDraft loads it back: the tracks and every segment's time.
    script = jy.DraftFolder(str(tmp_path / "drafts")).load_template(name)
    video = script.get_imported_track(jy.TrackType.video)
    starts = [round(s.target_timerange.start / 1e6 * FPS) for s in video.segments]
    assert starts == [0, 36, 60]
    assert [round(s.target_timerange.duration / 1e6 * FPS) for s in video.segments] == FRAMES
    dialogue = script.get_imported_track(jy.TrackType.audio, name="对白")
    music = script.get_imported_track(jy.TrackType.audio, name="音乐")
    assert [(s.target_timerange.start, s.target_timerange.duration) for s in music.segments] == [(1_000_000, 3_000_000)]
    assert dialogue.segments[0].target_timerange.start == 0
    texts = script.list_imported_tracks(jy.TrackType.text)
    spans = sorted((s.target_timerange.start, s.target_timerange.end) for t in texts for s in t.segments)
    assert spans == sorted((round(c.start_s * 1e6), round(c.end_s * 1e6)) for c in cues)
    assert len(texts) == 2  # the two simultaneous lines need a second subtitle track
    words = [json.loads(m["content"])["text"] for m in info["materials"]["texts"]]
    assert words == [c.text for c in cues]
    assert [t["name"] for t in info["materials"]["transitions"]] == ["叠化"]


def test_jianying_draft_with_the_editors_draft_folder_uses_absolute_paths(media, tmp_path):
    d, shots, cues, stems = media
    zip_path = tmp_path / "abs.zip"
    name = handoffs.write_jianying_draft(shots, cues, zip_path, media_dir=d, title="Cafe", width=64, height=112,
                                         fps=FPS, stems=stems[:1], draft_root="D:/JianyingPro Drafts")
    with zipfile.ZipFile(zip_path) as zf:
        info = json.loads(zf.read(f"{name}/draft_info.json"))
    paths = [m["path"] for m in info["materials"]["videos"] + info["materials"]["audios"]]
    assert all(p.startswith("D:/JianyingPro Drafts/Cafe/assets/") for p in paths) and len(paths) == 4


def test_a_missing_clip_is_one_error_and_leaves_nothing(media, tmp_path):
    d, shots, cues, stems = media
    broken = [shots[0].model_copy(update={"media": "shot-gone.mp4"})]
    with pytest.raises(StageError, match="shot-gone.mp4 is missing"):
        handoffs.write_jianying_draft(broken, [], tmp_path / "x.zip", media_dir=d, title="x", width=64,
                                      height=112, fps=FPS)
    assert list(tmp_path.iterdir()) == []


RENDERED = """Title: 咖啡馆

FADE IN:

INT. CAFE - NIGHT

Mio waits at the window.

MIO
You came back.

KAI
I never left.

DISSOLVE TO:

EXT. STREET - NIGHT

Kai walks away.

>未完待续<
"""


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_render_publishes_each_shot_and_hand_offs_that_point_at_them(tmp_path, prices, calibration):
    import hashlib

    import numpy as np

    from pipeline.config import resolve_profile
    from pipeline.plan import make_plan
    from pipeline.render import render
    from pipeline.store import open_store
    from stages.script import load_episode

    script = tmp_path / "cafe.fountain"
    script.write_text(RENDERED, encoding="utf-8")
    episode = load_episode(script)
    plan = make_plan(episode, resolve_profile("draft", {"short_side": 72, "aspect": "9:16"}), prices=prices,
                     calibration=calibration, script_sha256=hashlib.sha256(RENDERED.encode()).hexdigest())
    result = render(plan, store=open_store(tmp_path / "store"), prices=prices, ffmpeg=FFMPEG)
    out = result.outputs
    ids = [s.shot.id for s in plan.shots]
    assert {f"shot-{i}.mp4" for i in ids} | {"timeline.otio", "timeline.xml", "jianying_draft.zip"} <= set(out)
    # 1. OTIO and FCP XML: each shot on its own published clip, frame-exact against the plan.
    timeline = otio.adapters.read_from_file(str(out["timeline.otio"]))
    clips = list(timeline.video_tracks()[0].find_clips())
    assert [c.media_reference.target_url for c in clips] == [f"shot-{i}.mp4" for i in ids]
    assert [t.name for t in timeline.audio_tracks()] == ["dialogue"]  # the mix's dialogue stem (no bed named)
    assert (out["timeline.otio"].parent / list(timeline.audio_tracks()[0].find_clips())[0].media_reference.target_url
            ).is_file()
    assert [c.source_range.duration.value for c in clips] == [s.frames for s in plan.shots]
    fcp = otio.adapters.read_from_file(str(out["timeline.xml"]), adapter_name="fcp_xml")
    assert [c.name for c in fcp.video_tracks()[0].find_clips()] == ids
    # 2. The 剪映 draft reloads; its video segments sit where the plan puts the shots.
    with zipfile.ZipFile(out["jianying_draft.zip"]) as zf:
        zf.extractall(tmp_path / "drafts")
    name = handoffs.draft_name(plan.title)
    draft = jy.DraftFolder(str(tmp_path / "drafts")).load_template(name)
    segments = draft.get_imported_track(jy.TrackType.video).segments
    assert [round(s.start * plan.profile.fps / 1e6) for s in segments] == [s.start_frame for s in plan.shots]
    assert len(draft.get_imported_track(jy.TrackType.audio, name="对白").segments) == 1
    texts = [s for t in draft.list_imported_tracks(jy.TrackType.text) for s in t.segments]
    assert len(texts) == len(plan.subtitles) == 2
    # 3. The fade the script writes is on screen: the first frame of the first clip is black, a
    #    later one is not; the dissolve is the editor's (a transition in both hand-offs).
    def frame(clip: Path, index: int) -> np.ndarray:
        raw = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(clip), "-vf", f"select=eq(n\\,{index})",
                              "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(raw, np.uint8)

    first = out[f"shot-{ids[0]}.mp4"]
    assert frame(first, 0).mean() < 20 < frame(first, plan.shots[0].frames - 1).mean()
    assert any(isinstance(t, otio.schema.Transition) for t in timeline.tracks[0])
    info = json.loads((tmp_path / "drafts" / name / "draft_info.json").read_text(encoding="utf-8"))
    assert [t["name"] for t in info["materials"]["transitions"]] == ["叠化"]
