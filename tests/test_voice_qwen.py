"""The cloning voice backend (``voice = "vibevoice"``): the real transformers VibeVoice classes
(``VibeVoiceForConditionalGeneration``, ``VibeVoiceProcessor`` with its tokenizer, chat template
and feature extractor) at tiny size with random weights, built and saved here, loaded through
``stages.voice_qwen``, in a real Ray model actor and through a real render. Nothing is downloaded."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the VibeVoice backend needs the gen extra (make test installs it)")

from pipeline.config import resolve_profile  # noqa: E402
from pipeline.dag import Cluster  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from pipeline.render import render, speak, stored_speech  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from stages import voice  # noqa: E402
from stages.records import AnimError, Camera, DialogueLine, Episode, ProfileError, Scene, Shot, StageError  # noqa: E402
from stages.records import VoiceLine  # noqa: E402
from stages.voice_qwen import ClonedVoice, VibeVoiceSettings, VibeVoiceTTS  # noqa: E402

HOP = 512  # samples per acoustic latent of the tiny tokenizer (the real one: 3200, 7.5 latents a second)
MAX_LINE_S = 0.5
# VibeVoice's chat template as its transformers checkpoints ship it: the voices to clone, then the
# script, then the start of the speech.
TEMPLATE = """\
{%- set system_prompt = system_prompt | default(" Transform the text provided by various speakers into speech \
output, utilizing the distinct voice of each respective speaker.\\n") -%}
{{ system_prompt -}}
{%- set audio_bos_token = audio_bos_token | default("<|vision_start|>") %}
{%- set audio_eos_token = audio_eos_token | default("<|vision_end|>") %}
{%- set audio_token = audio_token | default("<|vision_pad|>") %}
{%- set ns = namespace(speakers_with_audio="") %}
{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- set has_audio = message['content'] | selectattr('type', 'equalto', 'audio') | list | length > 0 %}
    {%- if has_audio and role not in ns.speakers_with_audio %}
        {%- set ns.speakers_with_audio = ns.speakers_with_audio + role + "," %}
    {%- endif %}
{%- endfor %}
{%- if ns.speakers_with_audio %}
{{ " Voice input:\\n" }}
{%- for speaker in ns.speakers_with_audio.rstrip(',').split(',') %}
{%- if speaker %}
 Speaker {{ speaker }}:{{ audio_bos_token }}{{ audio_token }}{{ audio_eos_token }}{{ "\\n" }}
{%- endif %}
{%- endfor %}
{%- endif %}
 Text input:{{ "\\n" }}
{%- for message in messages %}
    {%- for item in message['content'] | selectattr('type', 'equalto', 'text') | list %}
 Speaker {{ message['role'] }}: {{ item['text'] }}{{ "\\n" }}
    {%- endfor %}
{%- endfor %}
 Speech output:{{ "\\n" }}{{ audio_bos_token }}"""


def save_vibevoice(path: Path) -> Path:
    """A tiny VibeVoice checkpoint: a byte-level BPE tokenizer with the model's special tokens (so
    Latin and CJK text both tokenize), the acoustic feature extractor at the tiny hop, a 2-layer
    Qwen2 language model, 1-layer diffusion head, random weights. Random weights never choose to
    speak, so the language model's head is given a lean towards the audio token (through a
    constant the first layer's value bias writes into the residual stream): the tiny model speaks
    every line for ``max_line_s``, and what it says still depends on the text and the voice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, VibeVoiceConfig, VibeVoiceForConditionalGeneration
    from transformers import VibeVoiceProcessor
    from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

    specials = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=specials[0], pad_token=specials[0])
    extractor = VibeVoiceAcousticTokenizerFeatureExtractor(pad_to_multiple_of=HOP)
    VibeVoiceProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=TEMPLATE).save_pretrained(path)
    codec = {"hidden_size": 16, "num_filters": 4, "kernel_size": 3, "downsampling_ratios": [8, 8, 8],
             "depths": [1, 1, 1, 1], "initializer_range": 0.1}
    config = VibeVoiceConfig(
        text_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(vocab),
                     "max_position_embeddings": 4096},
        audio_config={"model_type": "vibevoice_acoustic_tokenizer", **codec},
        semantic_model_config={"model_type": "vibevoice_acoustic_tokenizer_encoder", **codec, "hidden_size": 8},
        diffusion_head_config={"num_hidden_layers": 1, "intermediate_size": 64, "frequency_embedding_size": 32},
        pad_token_id=0, eos_token_id=0, audio_bos_token_id=1, audio_eos_token_id=2, audio_token_id=3)
    torch.manual_seed(0)  # weights only; the backend under test never touches the global RNG
    model = VibeVoiceForConditionalGeneration(config).eval()
    with torch.no_grad():
        attention = model.model.language_model.layers[0].self_attn
        attention.v_proj.bias.fill_(1.0)
        attention.o_proj.weight[0].fill_(1.0)
        model.lm_head.weight[:, 0] = -1.0
        model.lm_head.weight[config.audio_token_id, 0] = 1.0
    model.generation_config.noise_scheduler_class = "DPMSolverMultistepScheduler"
    model.generation_config.noise_scheduler_config = {"beta_schedule": "squaredcos_cap_v2",
                                                      "prediction_type": "v_prediction"}
    model.save_pretrained(path)
    return path


def write_reference(path: Path, *, hz: float, rate: int = 16000, seconds: float = 1.0) -> Path:
    """A voiced-like reference recording: a tone with harmonics under a syllable envelope."""
    t = np.arange(int(rate * seconds)) / rate
    x = sum(np.sin(2 * np.pi * hz * k * t) / k for k in (1, 2, 3)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    voice.write_wav(path, np.round(x / np.abs(x).max() * 20000).astype(np.int16), rate)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's operations are too small to share out: on two busy cores, torch's second
    thread makes a line 20x slower. One thread while this module runs (the actor has one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_vibevoice(tmp_path_factory.mktemp("tts") / "vibevoice")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    return {"low": write_reference(root / "aya.wav", hz=140.0), "high": write_reference(root / "other.wav", hz=310.0)}


def _settings(model: Path, **voices) -> VibeVoiceSettings:
    return VibeVoiceSettings(model=str(model), device="cpu", dtype="float32", diffusion_steps=3,
                             max_line_s=MAX_LINE_S, num_gpus=0, voices=voices)


AYA = VoiceLine(shot="s", index=0, character="AYA", text="Is anyone there? 有人吗?", language="cmn")


def test_a_line_is_speech_at_the_models_rate_the_same_every_time(model):
    tts = VibeVoiceTTS(settings=_settings(model))
    assert tts.sample_rate == 24000 and tts.hop == HOP
    state = torch.random.get_rng_state()
    first = tts.synthesize(AYA)
    assert np.array_equal(first, tts.synthesize(AYA))
    assert bool((torch.random.get_rng_state() == state).all())  # the global RNG untouched
    # The tiny model speaks every line to the cap: max_line_s in whole latents.
    assert len(first) == -(-int(MAX_LINE_S * 24000) // HOP) * HOP and np.abs(first).max() > 1000
    other = tts.synthesize(AYA.model_copy(update={"text": "Only me."}))
    assert not np.array_equal(first, other)
    # Another instance (another actor) speaks the line the same.
    assert np.array_equal(first, VibeVoiceTTS(settings=_settings(model)).synthesize(AYA))


def test_a_cloned_voice_changes_the_speech_and_the_key_follows_the_recordings_content(model, refs, tmp_path,
                                                                                      calibration, prices):
    plain = VibeVoiceTTS(settings=_settings(model)).synthesize(AYA)
    low = VibeVoiceTTS(settings=_settings(model, AYA=ClonedVoice(reference=str(refs["low"])))).synthesize(AYA)
    high = VibeVoiceTTS(settings=_settings(model, AYA=ClonedVoice(reference=str(refs["high"])))).synthesize(AYA)
    assert not np.array_equal(plain, low) and not np.array_equal(low, high)

    def keys(reference: Path | None) -> dict[str, str]:
        table = {"model": str(model), "device": "cpu", "num_gpus": 0}
        if reference is not None:
            table["voices"] = {"AYA": {"reference": str(reference)}}
        plan = make_plan(_episode(), resolve_profile("draft", {"voice": "vibevoice", "vibevoice": table}),
                         calibration=calibration, prices=prices, script_sha256="0" * 64)
        return {v.line.character: v.key for v in plan.voices}

    copy = shutil.copyfile(refs["low"], tmp_path / "elsewhere.wav")
    assert keys(refs["low"]) == keys(copy)  # the same recording under another path: the same key
    assert keys(refs["low"])["AYA"] != keys(refs["high"])["AYA"]  # another recording: AYA re-speaks
    assert keys(refs["low"])["KEN"] == keys(refs["high"])["KEN"] == keys(None)["KEN"]  # KEN is untouched
    assert keys(None)["AYA"] != keys(refs["low"])["AYA"]
    resolved = resolve_profile("draft", {"voice": "vibevoice", "vibevoice": {
        "model": str(model), "voices": {"AYA": {"reference": str(copy)}}}})
    assert resolved.settings_for("voice").model_dump(mode="json")["voices"]["AYA"]["reference"] == str(copy)


def test_a_missing_reference_recording_is_one_error_naming_it(model, tmp_path):
    missing = tmp_path / "no-such-voice.wav"
    with pytest.raises(ProfileError, match=f"\\[vibevoice\\] voices.AYA: .*reference recording {missing}: "
                                           "No such file or directory") as err:
        resolve_profile("draft", {"voice": "vibevoice", "vibevoice": {
            "model": str(model), "voices": {"AYA": {"reference": str(missing)}}}})
    assert "\n" not in str(err.value)


def test_absent_or_incomplete_weights_are_one_error_naming_the_path(model, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(StageError, match=f"VibeVoice model not found at {missing}: expected a local VibeVoice"):
        VibeVoiceTTS(settings=_settings(missing))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copyfile(model / "config.json", partial / "config.json")
    with pytest.raises(StageError, match=f"VibeVoice model incomplete \\(no processor_config.json, "
                                         f"tokenizer files, weights \\(\\*.safetensors\\)\\) at {partial}") as err:
        VibeVoiceTTS(settings=_settings(partial))
    assert "\n" not in str(err.value)


def _episode() -> Episode:
    shot = Shot(id="sc01-sh01", scene=1, camera=Camera.MEDIUM, duration_s=1.0, characters=["AYA", "KEN"], action="",
                dialogue=[DialogueLine(character="AYA", text="Is anyone there?", line=3),
                          DialogueLine(character="KEN", text="只有我。", line=5)], line=2)
    return Episode(title="t", source="t.fountain", characters=["AYA", "KEN"],
                   scenes=[Scene(index=1, heading="INT. ROOM - DAY", location="ROOM", line=1, shots=[shot])])


def _profile(model: Path, refs: dict[str, Path]):
    return resolve_profile("draft", {"voice": "vibevoice", "short_side": 64, "fps": 12, "audit": False,
                                     "vibevoice": {"model": str(model), "device": "cpu", "dtype": "float32",
                                                   "diffusion_steps": 3, "max_line_s": MAX_LINE_S, "num_gpus": 0,
                                                   "voices": {"AYA": {"reference": str(refs["low"])},
                                                              "KEN": {"speaker": 2}}}})


def test_a_tiny_episode_renders_with_cloned_voices_from_a_model_actor(model, refs, tmp_path, local_ray,
                                                                      calibration, prices):
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    profile = _profile(model, refs)
    plan = make_plan(_episode(), profile, calibration=calibration, prices=prices, script_sha256="1" * 64)
    assert plan.speech_timing == "estimate" and all(v.estimate_yuan > 0 for v in plan.voices)  # priced by its row
    store = open_store(str(tmp_path / "store"))
    spoken = speak(plan, store=store, prices=prices, ffmpeg=ffmpeg, cluster=Cluster())
    assert [r.stage for r in spoken.startups] == ["model_load"]  # the actor's start, billed on its own row
    assert sorted((r.stage, r.cached) for r in spoken.records) == [("voice", False)] * 2
    speech = stored_speech(plan, store)
    for v in plan.voices:
        wav, rate = voice.read_wav(store.get(v.key)["line.wav"])
        assert rate == 24000 and speech[v.key].duration_s == pytest.approx(len(wav) / rate)
    timed = make_plan(_episode(), profile, calibration=calibration, prices=prices, script_sha256="1" * 64,
                      speech=speech)
    assert timed.speech_timing == "measured"
    result = render(timed, store=store, prices=prices, ffmpeg=ffmpeg, spoken=spoken)
    assert result.stopped is None
    streams = subprocess.run([ffmpeg, "-hide_banner", "-i", str(result.outputs["episode.mp4"])],
                             capture_output=True, text=True).stderr
    assert "Audio: aac" in streams
    assert {r.stage for r in result.ledger.records} >= {"voice", "mix", "assemble"}


def test_a_backend_that_cannot_load_stops_the_render_with_one_line(tmp_path, local_ray, refs, calibration, prices):
    missing = tmp_path / "no-such-model"
    plan = make_plan(_episode(), _profile(missing, refs), calibration=calibration, prices=prices,
                     script_sha256="0" * 64)
    with pytest.raises(AnimError, match=f"the vibevoice voice backend could not start: .*not found at {missing}.*"
                                        "nothing was rendered") as err:
        speak(plan, store=open_store(str(tmp_path / "store")), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
              cluster=Cluster())
    assert "\n" not in str(err.value)


def test_the_reference_hash_is_the_files_content_and_a_changed_file_is_refused(model, refs, tmp_path):
    assert ClonedVoice(reference=str(refs["low"])).sha256 == hashlib.sha256(refs["low"].read_bytes()).hexdigest()
    changing = shutil.copyfile(refs["low"], tmp_path / "changing.wav")
    tts = VibeVoiceTTS(settings=_settings(model, AYA=ClonedVoice(reference=str(changing))))
    shutil.copyfile(refs["high"], changing)  # re-recorded after the plan's keys were made
    with pytest.raises(StageError, match=f"reference recording {changing} changed since the profile was read"):
        tts.synthesize(AYA)


def test_the_example_profile_is_valid_and_prices_the_voice_on_its_gpu(calibration, prices):
    from tests.conftest import REPO

    profile = resolve_profile(str(REPO / "examples" / "profiles" / "draft_vibevoice_gpu.toml"))
    assert profile.voice == "vibevoice" and profile.resources("voice").resource == "gpu:H200"
    plan = make_plan(_episode(), profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert len(plan.voices) == 2 and all(v.estimate_yuan > 0 for v in plan.voices)


def test_a_half_precision_model_clones_from_a_float_recording(model, refs):
    """Production runs the model in bfloat16; the reference's samples must follow its dtype."""
    settings = _settings(model, AYA=ClonedVoice(reference=str(refs["low"]))).model_copy(
        update={"dtype": "bfloat16", "max_line_s": 0.2})
    samples = VibeVoiceTTS(settings=settings).synthesize(AYA)
    assert len(samples) == -(-int(0.2 * 24000) // HOP) * HOP and np.abs(samples).max() > 1000
