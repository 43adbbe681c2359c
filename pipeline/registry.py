"""One registry entry per backend: what the planner, the node bodies and the executor need to
know about it, so that none of them branches on a backend's name.

An entry names its stage (``storyboard``, ``keyframes``, ``inbetween``) and its name (the
value of the profile field that selects it: ``storyboard``, ``backend``, ``interpolation``),
and carries:

* ``settings`` — its own settings model, the profile's table of the same name
  (``[diffusers]``, ``[flow]``, ``[rife]``); the model lives beside the stage;
* ``build`` — the factory: ``build(settings, width=, height=)`` returns the stage's callable
  (a storyboard backend is built with ``width=`` and ``aspect=`` of its panels);
* ``resources`` — what one worker of it holds (CPU, or GPUs of a priced type);
* ``calibration`` — the calibration row's backend id for these settings (``flow:medium``);
* ``placement`` — the settings that say where and how it runs (GPU type, batch size, actors,
  GPU count): they never enter a content key; every other setting does;
* ``actor`` — model-holding: a pool of Ray actors that load once and take batches;
* ``layered`` / ``generation_size`` — keyframe backends that draw one background plate per
  location and one sheet per character, and at which size they draw;
* ``still_pairs`` — the keyframe pairs a keyframe backend draws alike, known from the plan
  (``still_pairs(settings, scene, times, width, height)``): their in-betweens are copies, and
  the plan prices none of them. None known by default.

Adding a backend is one new stage file (its class and settings model) and one ``register``
call. A test can register a backend of its own (``register(..., replace=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from stages import inbetween, inbetween_adaptive, keyframes, storyboard, voice, voice_qwen
from stages.records import ProfileError, Record, ShotScene

STAGES = ("storyboard", "keyframes", "inbetween", "voice")
# The profile field that selects each stage's backend.
SELECTOR = {"storyboard": "storyboard", "keyframes": "backend", "inbetween": "interpolation", "voice": "voice"}
CPU = "cpu"


@dataclass(frozen=True)
class Resources:
    """What one worker of a backend holds: CPU cores, and GPUs of a price-catalog type."""

    gpus: float = 0.0
    gpu_type: str | None = None
    cpus: float = 1.0

    @property
    def resource(self) -> str:
        """The price-catalog resource billed for the worker's time ('cpu' or 'gpu:TYPE')."""
        return f"gpu:{self.gpu_type}" if self.gpus else CPU

    @property
    def units(self) -> float:
        return self.gpus if self.gpus else self.cpus


def _cpu(_: Any) -> Resources:
    return Resources()


def _none_still(*_: Any) -> list[int]:
    return []


def _no_size(_: Any, width: int, height: int) -> tuple[int, int]:
    return width, height


@dataclass(frozen=True)
class Backend:
    stage: str
    name: str
    settings: type[Record]
    build: Callable[..., Any]
    calibration: Callable[[Any], str]
    resources: Callable[[Any], Resources] = _cpu
    placement: frozenset[str] = field(default_factory=frozenset)
    actor: bool = False
    layered: Callable[[Any], bool] = lambda _: False
    generation_size: Callable[[Any, int, int], tuple[int, int]] = _no_size
    still_pairs: Callable[[Any, ShotScene, list[float], int, int], list[int]] = _none_still

    def key_params(self, settings: Record) -> dict[str, Any]:
        """What enters the content key of this backend's output: its name and every setting that
        changes pixels (a GPU device counts as 'cuda' whatever its index)."""
        # ``content_key`` lets a setting that names a file enter as its content (voice_qwen's references).
        params = settings.model_dump(mode="json", exclude=set(self.placement), context={"content_key": True})
        if isinstance(params.get("device"), str):
            params["device"] = params["device"].split(":", 1)[0]
        return {"backend": self.name, **params}

    def device(self, settings: Record) -> str:
        """The calibration row's device: where a worker of these settings runs."""
        return self.resources(settings).resource


_REGISTRY: dict[tuple[str, str], Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend; ``replace`` lets a test swap its own entry in."""
    if backend.stage not in STAGES:
        raise ValueError(f"backend {backend.name!r}: unknown stage {backend.stage!r}; stages: {', '.join(STAGES)}")
    key = (backend.stage, backend.name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"a {backend.stage} backend named {backend.name!r} is already registered")
    _REGISTRY[key] = backend
    return backend


def unregister(stage: str, name: str) -> None:
    _REGISTRY.pop((stage, name), None)


def names(stage: str) -> list[str]:
    return sorted(n for s, n in _REGISTRY if s == stage)


def get(stage: str, name: str) -> Backend:
    try:
        return _REGISTRY[(stage, name)]
    except KeyError:
        raise ProfileError(f"{SELECTOR.get(stage, stage)} = {name!r}: no such {stage} backend; "
                           f"known: {', '.join(names(stage))}") from None


def all_backends() -> list[Backend]:
    return list(_REGISTRY.values())


# --------------------------------------------------------------------------- the shipped backends


def _previz(settings: Any, *, width: int, height: int) -> Any:
    return keyframes.PrevizKeyframes(width=width, height=height)


def _diffusers(settings: Any, *, width: int, height: int) -> Any:
    from stages.diffusion import DiffusersKeyframes  # torch is imported only when it is built

    return DiffusersKeyframes(width=width, height=height, settings=settings)


def _on_gpu(device: str) -> bool:
    return device.split(":", 1)[0] not in ("cpu",)


def _diffusers_resources(s: keyframes.DiffusionSettings) -> Resources:
    return Resources(gpus=s.num_gpus, gpu_type=s.gpu_type) if _on_gpu(s.device) and s.num_gpus else Resources()


def _diffusers_size(s: keyframes.DiffusionSettings, width: int, height: int) -> tuple[int, int]:
    """Generate at ``gen_short_side`` (then resize to the profile size), else at the profile size."""
    if not s.gen_short_side:
        return width, height
    short = s.gen_short_side
    long = short * max(width, height) / min(width, height)
    return (long, short) if width >= height else (short, long)


def _rife(settings: inbetween.RifeSettings, *, width: int, height: int) -> Any:
    from stages.rife import RifeInterpolator  # torch is imported only when it is built

    return RifeInterpolator(weights=settings.weights, device=settings.device, passes=settings.passes)


def _rife_resources(s: inbetween.RifeSettings) -> Resources:
    return Resources(gpus=s.num_gpus, gpu_type=s.gpu_type) if _on_gpu(s.device) else Resources()


def _adaptive(s: inbetween_adaptive.AdaptiveSettings, *, width: int, height: int) -> Any:
    def rife() -> Any:
        from stages.rife import RifeInterpolator  # torch only when a pair needs RIFE

        return RifeInterpolator(weights=s.weights, device=s.device, passes=s.rife_passes)

    return inbetween_adaptive.AdaptiveInterpolator(
        flow=inbetween.FlowInterpolator(preset=s.preset), rife=rife, crossfade=inbetween.Crossfade(),
        threshold=s.threshold, subtle_motion=s.subtle_motion, rife_weight=s.rife_weight, fallback=s.fallback,
        fallback_above=s.fallback_above, subtle_alone=s.subtle_alone)


register(Backend("storyboard", "previz", keyframes.PrevizSettings,
                 build=lambda s, *, width, aspect: storyboard.PrevizStoryboard(width=width, aspect=aspect),
                 calibration=lambda s: "previz"))
register(Backend("keyframes", "previz", keyframes.PrevizSettings, build=_previz, calibration=lambda s: "previz",
                 still_pairs=lambda s, *a: keyframes.previz_still_pairs(*a)))
register(Backend("keyframes", "diffusers", keyframes.DiffusionSettings, build=_diffusers,
                 calibration=lambda s: f"diffusers:{s.family}:s{s.steps}", resources=_diffusers_resources,
                 placement=keyframes.DiffusionSettings.PLACEMENT, actor=True, layered=lambda s: s.layered,
                 generation_size=_diffusers_size))
register(Backend("inbetween", "flow", inbetween.FlowSettings,
                 build=lambda s, **_: inbetween.FlowInterpolator(preset=s.preset),
                 calibration=lambda s: f"flow:{s.preset}"))
register(Backend("inbetween", "crossfade", inbetween.CrossfadeSettings, build=lambda s, **_: inbetween.Crossfade(),
                 calibration=lambda s: "crossfade"))
register(Backend("inbetween", "rife", inbetween.RifeSettings, build=_rife,
                 calibration=lambda s: "rife" if s.passes == "per_time" else "rife:one",
                 resources=_rife_resources, placement=inbetween.RifeSettings.PLACEMENT))
register(Backend("inbetween", "adaptive", inbetween_adaptive.AdaptiveSettings, build=_adaptive,
                 calibration=lambda s: f"adaptive:{s.preset}", resources=_rife_resources,
                 placement=inbetween_adaptive.AdaptiveSettings.PLACEMENT))


def _espeak(settings: voice.EspeakSettings, **_: Any) -> Any:
    """eSpeak NG from the espeakng-loader wheel: its library and data paths, passed to the stage."""
    import espeakng_loader

    return voice.EspeakVoice(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path(),
                             settings=settings)


register(Backend("voice", "espeak", voice.EspeakSettings, build=_espeak, calibration=lambda s: "espeak"))


def _neural(settings: voice.NeuralVoiceSettings, **_: Any) -> Any:
    from stages.voice_neural import NeuralVoice  # torch and transformers are imported only when it is built

    return NeuralVoice(settings=settings)


def _neural_resources(s: voice.NeuralVoiceSettings) -> Resources:
    return Resources(gpus=s.num_gpus, gpu_type=s.gpu_type) if _on_gpu(s.device) and s.num_gpus else Resources()


register(Backend("voice", "neural", voice.NeuralVoiceSettings, build=_neural, calibration=lambda s: "neural:vits",
                 resources=_neural_resources, placement=voice.NeuralVoiceSettings.PLACEMENT, actor=True))


def _vibevoice(settings: voice_qwen.VibeVoiceSettings, **_: Any) -> Any:
    return voice_qwen.VibeVoiceTTS(settings=settings)  # torch and transformers are imported when it is built


def _vibevoice_resources(s: voice_qwen.VibeVoiceSettings) -> Resources:
    return Resources(gpus=s.num_gpus, gpu_type=s.gpu_type) if _on_gpu(s.device) and s.num_gpus else Resources()


register(Backend("voice", "vibevoice", voice_qwen.VibeVoiceSettings, build=_vibevoice,
                 calibration=lambda s: "vibevoice", resources=_vibevoice_resources,
                 placement=voice_qwen.VibeVoiceSettings.PLACEMENT, actor=True))
