"""The voice stage with the real eSpeak NG of the espeakng-loader wheel, and the cut it times:
a shot lasts its lines as spoken, each line's speech lies inside its cue, mouths follow the voice."""
from __future__ import annotations

import espeakng_loader
import numpy as np
import pytest

from pipeline.config import resolve_profile
from pipeline.plan import make_plan, voice_key, voice_line
from stages import voice
from stages.records import Camera, DialogueLine, Episode, Scene, Shot, ShotScene, SpokenLine, StageError, VoiceLine
from stages.staging import layout


@pytest.fixture(scope="module")
def espeak():
    return voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                             settings=voice.EspeakSettings())


def line(text: str, who: str = "AYA", shot: str = "sc01-sh01") -> VoiceLine:
    return VoiceLine(shot=shot, index=0, character=who, text=text, language=voice.language_of(text))


@pytest.mark.parametrize("text, language", [("Is anyone there? I can hear you.", "en"),
                                            ("等一下。这张请柬上，写的是我的名字。", "cmn")])
def test_espeak_speaks_english_and_mandarin_into_a_measured_wav(espeak, tmp_path, text, language):
    assert voice.language_of(text) == language
    speech = espeak(line(text), tmp_path / "line.wav")
    samples, rate = voice.read_wav(tmp_path / "line.wav")
    assert rate == espeak.sample_rate == speech.sample_rate
    assert speech.duration_s == pytest.approx(len(samples) / rate)
    assert 1.0 < speech.duration_s < 10.0
    assert 0.0 <= speech.speech_start_s < speech.speech_end_s <= speech.duration_s
    assert np.abs(samples.astype(np.int32)).max() > 3000  # real sound, not silence
    assert len(speech.envelope) == pytest.approx(speech.duration_s * speech.envelope_hz, abs=1)
    assert max(speech.envelope) == pytest.approx(1.0) and min(speech.envelope) < 0.2  # pauses between words


def test_each_character_has_a_stable_voice_of_its_own_and_the_profile_can_set_it(espeak, tmp_path):
    settings = voice.EspeakSettings()
    aya, ken = voice.voice_for(settings, line("Hello.", "AYA")), voice.voice_for(settings, line("Hello.", "KEN"))
    assert (aya.variant, aya.pitch) != (ken.variant, ken.pitch)
    assert voice.voice_for(settings, line("Hi again.", "AYA")) == aya
    low = voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                            settings=voice.EspeakSettings(voices={"AYA": voice.CharacterVoice(pitch=5, rate=120)}))
    a = espeak.synthesize(line("Hello there, my friend."))
    b = low.synthesize(line("Hello there, my friend."))
    assert len(b) > len(a) * 1.15  # a slower voice speaks longer


def test_a_line_sounds_the_same_whatever_was_spoken_before_it_and_in_another_process(espeak):
    """A voice artifact is stored under its content key: the same line must give the same samples
    every time (eSpeak's own state and clock-seeded noise would make them differ)."""
    target = line("Mei! Look up!", who="KAI")
    first = espeak.synthesize(target).tobytes()
    espeak.synthesize(line("No, not yet, but it will soon.", who="BOB"))
    espeak.synthesize(line("等一下。这张请柬上，写的是我的名字。", who="林小雨"))
    assert espeak.synthesize(target).tobytes() == first
    other = voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                              settings=espeak.settings)
    assert other.synthesize(target).tobytes() == first


def test_a_voice_espeak_does_not_have_is_one_line_naming_the_line(tmp_path):
    bad = voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                            settings=voice.EspeakSettings(voices={"AYA": voice.CharacterVoice(language="xx-nope")}))
    with pytest.raises(StageError, match=r"voice\[sc01-sh01\]: line 1 \(AYA\): eSpeak has no voice 'xx-nope"):
        bad(line("Hello."), tmp_path / "x.wav")
    with pytest.raises(StageError, match="eSpeak NG library not found at /nowhere/libespeak-ng.so"):
        voice.EspeakVoice(library="/nowhere/libespeak-ng.so", data=espeakng_loader.get_data_path(),
                          settings=voice.EspeakSettings())


def _episode(*dialogue: DialogueLine, duration_s: float = 1.0) -> Episode:
    shot = Shot(id="sc01-sh01", scene=1, camera=Camera.MEDIUM, duration_s=duration_s, characters=["AYA", "KEN"],
                action="", dialogue=list(dialogue), line=2)
    after = Shot(id="sc01-sh02", scene=1, camera=Camera.WIDE, duration_s=1.0, characters=[], action="Rain.", line=9)
    return Episode(title="t", source="t.fountain", characters=["AYA", "KEN"],
                   scenes=[Scene(index=1, heading="INT. ROOM - DAY", location="ROOM", line=1, shots=[shot, after])])


def test_the_cut_follows_the_voice_and_cues_hold_the_measured_speech(espeak, tmp_path, calibration, prices):
    ep = _episode(DialogueLine(character="AYA", text="Is anyone there? I came back for you.", line=3),
                  DialogueLine(character="KEN", text="只有我一个人在这里。", line=5))
    profile = resolve_profile("draft", {"breath_s": 0.25})
    guess = make_plan(ep, profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert guess.speech_timing == "estimate" and not any(v.measured for v in guess.voices)
    # speak every line as a render does first, then plan with what was measured
    speech = {}
    for v in guess.voices:
        assert v.key == voice_key(profile, voice_line(ep.shots[0], v.line.index))
        speech[v.key] = espeak(v.line, tmp_path / f"{v.id}.wav")
    plan = make_plan(ep, profile, calibration=calibration, prices=prices, script_sha256="0" * 64, speech=speech)
    assert plan.speech_timing == "measured"
    shot = plan.shots[0]
    spoken = sum(speech[v.key].duration_s for v in plan.voices)
    assert shot.frames / 24 >= spoken + 2 * 0.25  # a 1 s shot holds both lines and a breath after each
    assert plan.shots[1].frames == 24  # a shot without dialogue keeps its length
    end = shot.frames / 24
    for v, cue in zip(plan.voices, plan.subtitles):
        sp = speech[v.key]
        assert cue.speech_start_s == pytest.approx(v.start_s + sp.speech_start_s, abs=1e-3)
        assert cue.start_s <= cue.speech_start_s < cue.speech_end_s <= cue.end_s <= end
    assert plan.voices[0].start_s + speech[plan.voices[0].key].duration_s <= plan.voices[1].start_s
    # the frames' keys follow the measured speech (the mouths), the storyboard's do not
    assert shot.keys["keyframes"] != guess.shots[0].keys["keyframes"]
    assert shot.keys["storyboard"] == guess.shots[0].keys["storyboard"]
    assert [s.character for s in shot.scene.speech] == ["AYA", "KEN"]


def test_mouths_open_with_the_envelope_and_shut_in_silence():
    shot = Shot(id="s", scene=1, camera=Camera.MEDIUM, duration_s=2.0, characters=["AYA"], action="",
                dialogue=[DialogueLine(character="AYA", text="Hi.", line=1)], line=1)
    env = [0.0] * 10 + [1.0] * 10 + [0.0] * 10  # 50 Hz: loud from 0.2 s to 0.4 s after the line starts
    spoken = [SpokenLine(character="AYA", start_s=0.5, envelope_hz=50.0, envelope=env)]

    def mouth(t_s: float) -> float:
        return layout(shot, t=t_s / 2.0, width=320, height=180, speech=spoken, duration_s=2.0)[0].mouth

    assert mouth(0.8) == 1.0 and mouth(0.55) == 0.0 and mouth(1.5) == 0.0
    ShotScene(shot=shot, heading="INT. ROOM - DAY", location="ROOM", time_of_day="DAY", speech=spoken)
