"""The mix with real ffmpeg, real pyloudnorm and real eSpeak lines: loudness on target after AAC,
the bed ducked under speech, stems that add up to the mix, a missing bed named."""
from __future__ import annotations

import subprocess

import espeakng_loader
import imageio_ffmpeg
import numpy as np
import pytest

from stages import mix, voice
from stages.records import StageError, VoiceLine

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> list[mix.Placement]:
    d = tmp_path_factory.mktemp("lines")
    speaker = voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                                settings=voice.EspeakSettings())
    out = []
    for i, (who, text, at) in enumerate([("AYA", "Is anyone there?", 0.5), ("KEN", "只有我。", 4.0)]):
        speaker(VoiceLine(shot="s", index=i, character=who, text=text, language=voice.language_of(text)),
                d / f"{i}.wav")
        out.append(mix.Placement(str(d / f"{i}.wav"), at))
    return out


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """Pink noise as a real compressed file (Vorbis in Ogg), shorter than the episode: it loops."""
    path = tmp_path_factory.mktemp("bed") / "rain.ogg"
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "anoisesrc=color=pink:amplitude=0.5:d=2.5",
                    "-ac", "2", "-c:a", "libvorbis", str(path)], check=True)
    return path


@pytest.mark.parametrize("target", [-16.0, -23.0])
def test_the_delivered_aac_is_within_one_lu_of_the_target(lines, bed, tmp_path, target):
    got = mix.mix(lines, 7.0, tmp_path, ffmpeg=FFMPEG, target_lufs=target, bed=bed)
    assert abs(got.loudness_lufs - target) < 1.0
    decoded = mix.decode(tmp_path / "mix.m4a", ffmpeg=FFMPEG)
    assert len(decoded) / mix.RATE == pytest.approx(7.0, abs=0.03)
    assert abs(mix.loudness(decoded) - target) < 1.0  # measured on what a player plays
    assert got.peak_db <= -1.0 + 1e-6


def test_the_bed_ducks_under_speech_and_the_stems_add_up_to_the_mix(lines, bed, tmp_path):
    mix.mix(lines, 7.0, tmp_path, ffmpeg=FFMPEG, bed=bed, duck_db=12.0)
    music, _ = voice.read_wav(tmp_path / "music.wav")
    dialogue, _ = voice.read_wav(tmp_path / "dialogue.wav")
    music = music.astype(np.float64) / 32768

    def rms(a: float, b: float) -> float:
        return float(np.sqrt(np.mean(music[int(a * mix.RATE):int(b * mix.RATE)] ** 2)))

    speaking = rms(1.0, 1.3)  # inside the first line
    quiet = rms(3.0, 3.6)  # between the lines, the bed recovered
    assert 20 * np.log10(quiet / speaking) == pytest.approx(12.0, abs=2.0)
    total = (dialogue.astype(np.float64) / 32768 + music)
    decoded = mix.decode(tmp_path / "mix.m4a", ffmpeg=FFMPEG)[: len(total)]
    assert mix.loudness(total.astype(np.float32)) == pytest.approx(mix.loudness(decoded), abs=0.5)


def test_a_mix_without_a_bed_writes_no_music_stem(lines, tmp_path):
    got = mix.mix(lines, 6.0, tmp_path, ffmpeg=FFMPEG)
    assert got.bed_lufs is None and not (tmp_path / "music.wav").exists()
    assert (tmp_path / "dialogue.wav").is_file() and (tmp_path / "mix.m4a").is_file()


def test_a_missing_bed_is_one_line_naming_it(lines, tmp_path):
    with pytest.raises(StageError, match=r"mix: music bed /no/such/rain.ogg: no such file"):
        mix.mix(lines, 6.0, tmp_path, ffmpeg=FFMPEG, bed="/no/such/rain.ogg")
    assert not (tmp_path / "mix.m4a").exists()


def test_an_episode_without_dialogue_or_bed_still_has_a_silent_track(tmp_path):
    got = mix.mix([], 2.0, tmp_path, ffmpeg=FFMPEG)
    assert got.loudness_lufs is None and got.peak_db is None and got.gain_db == 0.0
    decoded = mix.decode(tmp_path / "mix.m4a", ffmpeg=FFMPEG)
    assert len(decoded) / mix.RATE == pytest.approx(2.0, abs=0.03) and np.abs(decoded).max() == 0.0
