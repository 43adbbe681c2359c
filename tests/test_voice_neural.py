"""The neural voice backend: the real transformers VitsModel at tiny size with random weights
(tests/tiny_tts.py), loaded in a real Ray model actor through the voice nodes, and one clear error
naming the path when the weights are absent. Nothing is downloaded."""
from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline.config import resolve_profile
from pipeline.dag import Cluster
from pipeline.plan import make_plan
from pipeline.render import speak, stored_speech
from pipeline.store import open_store
from stages import voice
from stages.records import AnimError, Camera, DialogueLine, Episode, Scene, Shot, StageError, VoiceLine

from .tiny_tts import save_vits


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    return save_vits(tmp_path_factory.mktemp("tts") / "vits")


def _episode() -> Episode:
    shot = Shot(id="sc01-sh01", scene=1, camera=Camera.MEDIUM, duration_s=1.0, characters=["AYA", "KEN"], action="",
                dialogue=[DialogueLine(character="AYA", text="Is anyone there?", line=3),
                          DialogueLine(character="KEN", text="only me.", line=5)], line=2)
    return Episode(title="t", source="t.fountain", characters=["AYA", "KEN"],
                   scenes=[Scene(index=1, heading="INT. ROOM - DAY", location="ROOM", line=1, shots=[shot])])


def _profile(model: str):
    return resolve_profile("draft", {"voice": "neural", "neural": {"model": model, "device": "cpu", "num_gpus": 0,
                                                                     "voices": {"KEN": {"speaker": 1}}}})


def test_a_tiny_vits_speaks_each_line_in_a_model_actor(vits, tmp_path, local_ray, calibration, prices):
    profile = _profile(str(vits))
    plan = make_plan(_episode(), profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    store = open_store(str(tmp_path / "store"))
    ran = speak(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=Cluster())
    assert [r.stage for r in ran.startups] == ["model_load"]  # the actor's start, billed on its own row
    assert sorted((r.stage, r.shot, r.cached) for r in ran.records) == [("voice", "sc01-sh01", False)] * 2
    speech = stored_speech(plan, store)
    assert set(speech) == {v.key for v in plan.voices}
    for v in plan.voices:
        wav, rate = voice.read_wav(store.get(v.key)["line.wav"])
        assert rate == 16000 and np.abs(wav).max() > 1000
        assert speech[v.key].duration_s == pytest.approx(len(wav) / rate)
    timed = make_plan(_episode(), profile, calibration=calibration, prices=prices, script_sha256="0" * 64,
                      speech=speech)
    assert timed.speech_timing == "measured"
    again = speak(timed, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=Cluster())
    assert all(r.cached for r in again.records) and not again.startups  # all in the store: no actor starts


def test_speakers_and_lines_are_deterministic_and_distinct(vits):
    from stages.voice_neural import NeuralVoice

    speaker = NeuralVoice(settings=voice.NeuralVoiceSettings(model=str(vits), device="cpu",
                                                             voices={"KEN": voice.NeuralCharacterVoice(speaker=1)}))
    state = __import__("torch").random.get_rng_state()
    aya = speaker.synthesize(VoiceLine(shot="s", index=0, character="AYA", text="hello there.", language="en"))
    assert np.array_equal(aya, speaker.synthesize(VoiceLine(shot="s", index=0, character="AYA", text="hello there.",
                                                            language="en")))
    assert bool((__import__("torch").random.get_rng_state() == state).all())  # the global RNG untouched
    ken = speaker.synthesize(VoiceLine(shot="s", index=0, character="KEN", text="hello there.", language="en"))
    assert not (len(aya) == len(ken) and np.array_equal(aya, ken))


def test_absent_weights_are_one_error_naming_the_path(tmp_path, local_ray, calibration, prices):
    from stages.voice_neural import NeuralVoice

    missing = tmp_path / "no-such-model"
    with pytest.raises(StageError, match=f"neural voice model not found at {missing}"):
        NeuralVoice(settings=voice.NeuralVoiceSettings(model=str(missing), device="cpu"))
    plan = make_plan(_episode(), _profile(str(missing)), calibration=calibration, prices=prices,
                     script_sha256="0" * 64)
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(AnimError, match=f"the neural voice backend could not start: .*not found at {missing}.*"
                                        "nothing was rendered") as err:
        speak(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=Cluster())
    assert "\n" not in str(err.value).split("; expected")[0]
