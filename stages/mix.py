"""The mix: dialogue placed on the episode timeline, an optional music or ambience bed ducked
under speech, the whole loudness-normalised to a delivery target and encoded as AAC.

1. Each line's WAV is resampled to 48 kHz and placed where the plan puts its speech.
2. A bed (a local file in any format ffmpeg reads) is decoded, looped or cut to the episode,
   set ``bed_db`` under the dialogue's level and ducked by ``duck_db`` wherever a line speaks
   (a gain that falls in ``attack_s`` and recovers in ``release_s``).
3. The sum is measured with pyloudnorm (ITU-R BS.1770-4 integrated loudness) and one gain
   brings it to ``target_lufs``; a soft limiter keeps samples under ``ceiling_db`` (dBFS), and
   the gain is raised until the limited result is on target (``Mix.loudness_lufs``); the
   stems carry that gain and no limiter.
4. The stems (dialogue, bed) carry the same gain, so dialogue + bed = the mix; they are
   written as 16-bit WAV, the mix as AAC in an .m4a (ffmpeg's native encoder).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.records import StageError

VERSION = "1"
STAGE = "mix"
RATE = 48000


@dataclass(frozen=True)
class Placement:
    """One spoken line on the timeline: its WAV and where its first sample sits (seconds)."""

    wav: str
    start_s: float


@dataclass(frozen=True)
class Mix:
    """What the mix measured: the delivered loudness and each stem's."""

    duration_s: float
    loudness_lufs: float | None  # None: silence (no dialogue, no bed)
    dialogue_lufs: float | None
    bed_lufs: float | None
    gain_db: float
    peak_db: float | None


def _read_wav(path: str) -> tuple[np.ndarray, int]:
    import wave

    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise StageError(STAGE, None, f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        channels, rate = w.getnchannels(), w.getframerate()
    return (data.reshape(-1, channels).mean(axis=1) if channels > 1 else data), rate


def _to_rate(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return x
    from scipy.signal import resample_poly  # scipy only when a line is mixed: `anim plan` imports this module

    g = np.gcd(rate, RATE)
    return resample_poly(x, RATE // g, rate // g).astype(np.float32)


def dialogue_track(lines: list[Placement], duration_s: float) -> np.ndarray:
    """Every line at its place on a silent track of ``duration_s`` (48 kHz mono float); a line
    that would run past the end is cut there."""
    n = round(duration_s * RATE)
    track = np.zeros(n, np.float32)
    for line in lines:
        x, rate = _read_wav(line.wav)
        x = _to_rate(x, rate)
        at = round(line.start_s * RATE)
        if at >= n:
            continue
        end = min(at + len(x), n)
        track[at:end] += x[: end - at]
    return track


def decode_bed(path: str | Path, duration_s: float, *, ffmpeg: str) -> np.ndarray:
    """A music or ambience file as 48 kHz mono float, looped or cut to ``duration_s``."""
    path = Path(path)
    if not path.is_file():
        raise StageError(STAGE, None, f"music bed {path}: no such file")
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), "-vn", "-ac", "1",
           "-ar", str(RATE), "-f", "f32le", "pipe:1"]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise StageError(STAGE, None, f"music bed {path}: ffmpeg cannot decode it (exit {result.returncode})",
                         result.stderr.decode(errors="replace"), transient=result.returncode < 0)
    x = np.frombuffer(result.stdout, dtype="<f4")
    if not x.size:
        raise StageError(STAGE, None, f"music bed {path}: no audio in it")
    n = round(duration_s * RATE)
    return np.resize(x, n).astype(np.float32)  # np.resize repeats the bed to fill the episode


def duck_gain(speech: np.ndarray, *, duck_db: float, attack_s: float = 0.08, release_s: float = 0.4,
              hold_s: float = 0.15) -> np.ndarray:
    """Per-sample gain for the bed: 1 where nobody speaks, ``-duck_db`` dB under speech, with the
    speech found from 10 ms windows above -45 dBFS and held ``hold_s`` across short pauses."""
    win = RATE // 100
    n = -(-len(speech) // win)
    frames = np.pad(speech, (0, n * win - len(speech))).reshape(n, win)
    active = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) > 10 ** (-45 / 20)
    hold = max(int(hold_s * 100), 1)
    if active.any():
        idx = np.flatnonzero(active)
        for i in idx:  # extend each active window by the hold time, both sides
            active[max(i - hold, 0): i + hold + 1] = True
    target = np.where(active, 10 ** (-duck_db / 20), 1.0)
    gain = np.empty(n)
    g = 1.0
    up, down = 1 / max(release_s * 100, 1), 1 / max(attack_s * 100, 1)
    for i, t in enumerate(target):  # a one-pole ramp: falls in attack_s, recovers in release_s
        g += (t - g) * (down if t < g else up)
        gain[i] = g
    return np.repeat(gain, win)[: len(speech)].astype(np.float32)


def loudness(x: np.ndarray) -> float:
    """Integrated loudness, LUFS (BS.1770-4); -inf for silence."""
    import pyloudnorm  # (and scipy) only when something is measured

    if len(x) < RATE // 2:  # the meter needs at least one 400 ms block
        x = np.pad(x, (0, RATE // 2 - len(x)))
    return float(pyloudnorm.Meter(RATE).integrated_loudness(x.astype(np.float64)))


def write_wav(path: str | Path, x: np.ndarray) -> None:
    import wave

    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def encode_aac(x: np.ndarray, path: str | Path, *, ffmpeg: str, bitrate: str = "160k") -> None:
    """Stereo AAC-LC in an .m4a at ``path`` (the mono mix on both channels)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.part.m4a")
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(RATE),
           "-ac", "1", "-i", "pipe:0", "-ac", "2", "-c:a", "aac", "-b:a", bitrate, str(tmp)]
    result = subprocess.run(cmd, input=np.ascontiguousarray(x, dtype="<f4").tobytes(), capture_output=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StageError(STAGE, None, f"encoding the mix as AAC failed (ffmpeg exit {result.returncode}); "
                         "nothing written", result.stderr.decode(errors="replace"), transient=result.returncode < 0)
    os.replace(tmp, path)


def mix(lines: list[Placement], duration_s: float, out_dir: str | Path, *, ffmpeg: str, target_lufs: float = -16.0,
        bed: str | Path | None = None, bed_db: float = -12.0, duck_db: float = 10.0,
        ceiling_db: float = -1.0) -> Mix:
    """Write ``dialogue.wav``, ``music.wav`` (with a bed) and ``mix.m4a`` into ``out_dir``."""
    out = Path(out_dir)
    # 1. Dialogue on the timeline.
    dialogue = dialogue_track(lines, duration_s)
    speech_lufs = loudness(dialogue)
    # 2. The bed, set under the dialogue's level and ducked under speech.
    music = None
    if bed is not None:
        music = decode_bed(bed, duration_s, ffmpeg=ffmpeg)
        bed_lufs = loudness(music)
        ref = speech_lufs if np.isfinite(speech_lufs) else target_lufs
        if np.isfinite(bed_lufs):
            music *= 10 ** ((ref + bed_db - bed_lufs) / 20)
        music *= duck_gain(dialogue, duck_db=duck_db)
    music_lufs = loudness(music) if music is not None else None
    total = dialogue + music if music is not None else dialogue.copy()
    # 3. One gain to the target, a soft limiter over the ceiling, measured again: the limiter takes
    #    some loudness off peaky speech, so the gain is raised until the limited mix is on target.
    before = loudness(total)
    gain_db = target_lufs - before if np.isfinite(before) else 0.0
    limited = _limit(total * 10 ** (gain_db / 20), ceiling_db)
    now = loudness(limited)
    for _ in range(6):
        if not np.isfinite(now) or abs(now - target_lufs) < 0.05:
            break
        gain_db += target_lufs - now
        limited = _limit(total * 10 ** (gain_db / 20), ceiling_db)
        now = loudness(limited)
    gain = 10 ** (gain_db / 20)
    total, dialogue = limited, dialogue * gain
    music = music * gain if music is not None else None
    # 4. Stems and the AAC mix (a stem's loudness is its measured level plus the gain: BS.1770 is linear in it).
    write_wav(out / "dialogue.wav", dialogue)
    if music is not None:
        write_wav(out / "music.wav", music)
    encode_aac(total, out / "mix.m4a", ffmpeg=ffmpeg)
    peak = float(np.abs(total).max()) if total.size else 0.0

    def level(lufs: float | None) -> float | None:
        return round(float(lufs), 2) if lufs is not None and np.isfinite(lufs) else None

    return Mix(duration_s=len(total) / RATE, loudness_lufs=level(now), dialogue_lufs=level(speech_lufs + gain_db),
               bed_lufs=level(music_lufs + gain_db) if music_lufs is not None else None, gain_db=round(gain_db, 2),
               peak_db=round(float(20 * np.log10(peak)), 2) if peak > 0 else None)


def _limit(x: np.ndarray, ceiling_db: float) -> np.ndarray:
    """A soft limiter: samples past 0.8 × the ceiling bend along a tanh knee that never reaches it."""
    ceiling = 10 ** (ceiling_db / 20)
    knee = ceiling * 0.8
    over = np.abs(x) > knee
    if not over.any():
        return x
    bent = np.sign(x) * (knee + (ceiling - knee) * np.tanh((np.abs(x) - knee) / (ceiling - knee)))
    return np.where(over, bent, x).astype(np.float32)


def decode(path: str | Path, *, ffmpeg: str) -> np.ndarray:
    """Any audio file (the first audio stream of a video too) as 48 kHz mono float: for checks."""
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1",
           "-ar", str(RATE), "-f", "f32le", "pipe:1"]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise StageError(STAGE, None, f"cannot decode the audio of {path} (ffmpeg exit {result.returncode})",
                         result.stderr.decode(errors="replace"))
    return np.frombuffer(result.stdout, dtype="<f4")
