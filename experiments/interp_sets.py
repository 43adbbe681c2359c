"""The in-betweening evaluation sets: real triplets with a true middle frame, consecutive and wide-step.

A triplet of step k is frames (n - k, n, n + k) of one real sequence: predict n at t = 0.5 from
its neighbours and compare it with the real n (``between`` holds every real frame between the two
keyframes, n - k + 1 … n + k - 1 at t = j / 2k, for the in-betweens at other times). k = 1 is the consecutive triplet; k = 2, 3, 4 give
two, three, four times the motion (and its blur stays that of one frame), which is what a
keyframe pair of an anime shot looks like.

Sources (all in ../shared/data/frames, see its README for licences):

* ``bbb``: the Big Buck Bunny clip (1280×720, 24 fps, 720 frames), decoded and resized to
  640×360 (the draft profile's size; RIFE at 720p costs ~4× more per frame on this machine);
* ``pigs_gif``: the hand-drawn Pigs in a Polka GIF (314×273, 30 frames), native size;
* ``sintel``: the three MPI-Sintel folders (raft 5 frames, alley clean and final 4 each),
  native 1024×436;
* ``chaplin`` (unseen part only): the live-action clip (640×360, 241 frames at 25 fps), its
  duplicate frames removed (~160 remain).

The declared split (``part``): the threshold and every other choice of the adaptive in-betweener
are made on ``tune`` and reported on ``report``.

* ``tune``: bbb triplets whose three frames lie in frames 0–359 (the first 15 s) and GIF triplets
  within frames 0–14;
* ``report``: bbb triplets within frames 360–719, GIF triplets within frames 15–29, and every
  Sintel triplet: Sintel is never used for any choice. No frame is in both parts.
* ``fresh``: more held-out triplets from the report part's frames, added after the report part
  had been looked at (2026-12-02) and measured only with settings chosen on ``tune``: bbb and GIF
  triplets of the report range whose (centre, step) is not a report triplet — ``fresh_per`` per
  bbb step spaced evenly over the rest, every remaining GIF triplet. They share frames with report
  triplets but none is one, so no choice has seen them; Sintel has none left.
* ``unseen``: bbb triplets of the report range whose (centre, step) is in neither report nor
  fresh, ``unseen_per`` per step spaced evenly over what is left, added 2026-12-03 after both had
  been looked at: the held-out part of the bench's second protocol, which chooses on everything
  looked at (tune, report, fresh) because the tune part's frames 0–359 lack the slow pans of the
  later passage where RIFE beats the flow on consecutive frames. The GIF and Sintel have nothing
  left for it; instead it has ``chaplin``: the live-action clip, never in the sets before, its
  decoded duplicates (every third frame) dropped so that the film's own frames, evenly spaced in
  time, remain; ``unseen_per`` triplets per step, away from the raw frames 55–76 that the bench's
  section 1 table shows (``EXCLUDED_CHAPLIN``).
* ``final``: added 2026-12-03 after the unseen part had been looked at (run D): bbb triplets of the
  report range whose (centre, step) is in no earlier part, and chaplin triplets whose (centre, step)
  is not an unseen one, ``final_per`` per step each: the held-out part of the protocol that chooses
  on every part looked at (tune, report, fresh, unseen). They share frames with earlier triplets,
  as fresh and unseen do, but none is one.

The three bbb PNG triplets of ../shared/data/frames/bbb (centres 120, 430, 487) were used to pick
the flow preset before this split existed; centres 430 and 487 fall in ``report`` and are left
out of the sets (``EXCLUDED_BBB``) so that no report triplet was used for a choice.

Centres are spaced evenly over each part (``per`` per step and part); a triplet whose middle equals
a neighbour (a hold: the black frames that open bbb, a GIF duplicate) is left out — holds are copied,
and measured elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageSequence

REPO = Path(__file__).resolve().parents[1]
FRAMES = REPO.parent / "shared" / "data" / "frames"
STEPS = (1, 2, 3, 4)
PARTS = ("tune", "report", "fresh", "unseen", "final")
BBB_SIZE = (640, 360)
BBB_FRAMES = 720
BBB_SPLIT = 360  # centres below: tune; at or above: report
GIF_SPLIT = 15
EXCLUDED_BBB = range(415, 500)  # around the shared PNG triplets 430 and 487 (used for the flow preset)
LOOKED_AT = {"tune": 12, "report": 6, "fresh": 12, "unseen": 12, "final": 0}  # the counts of the runs looked at
EXCLUDED_CHAPLIN = range(55, 77)  # raw frames around the bench's section 1 triplets (60-71)
DUPLICATE_PSNR = 40.0  # consecutive decoded frames closer than this are one film frame shown twice
SINTEL = ("sintel_raft_demo", "sintel_alley1_clean", "sintel_alley1_final")


@dataclass(frozen=True)
class Triplet:
    set: str  # "bbb" | "pigs_gif" | "sintel" | "chaplin"
    step: int
    part: str  # one of PARTS
    name: str
    a: np.ndarray
    mid: np.ndarray
    b: np.ndarray
    between: tuple[np.ndarray, ...] = ()  # every real frame strictly between a and b (2k - 1, mid among them)

    @property
    def times(self) -> list[float]:
        """The in-between times of ``between``: j / 2k (k = 1: 0.5 alone)."""
        return [j / (2 * self.step) for j in range(1, 2 * self.step)]


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _spaced(lo: int, hi: int, n: int) -> list[int]:
    """``n`` integers evenly spaced over [lo, hi] (fewer if the range is short)."""
    if hi < lo:
        return []
    if hi - lo + 1 <= n:
        return list(range(lo, hi + 1))
    return sorted({round(x) for x in np.linspace(lo, hi, n)})


def _bbb_centres(step: int, part: str, per: dict[str, int]) -> list[int]:
    lo, hi = (step, BBB_SPLIT - 1 - step) if part == "tune" else (BBB_SPLIT + step, BBB_FRAMES - 1 - step)
    # spaced over the allowed centres (the excluded window removed), offset by the step so that
    # the steps do not all share one centre
    allowed = [c for c in range(lo, hi + 1) if c not in EXCLUDED_BBB and c - step not in EXCLUDED_BBB
               and c + step not in EXCLUDED_BBB]
    if part in ("fresh", "unseen", "final"):  # the report range's centres no earlier part uses, spaced anew
        earlier = PARTS[1:PARTS.index(part)]
        used = {c for p in earlier for counts in (per, LOOKED_AT) for c in _bbb_centres(step, p, counts)}
        allowed = [c for c in allowed if c not in used]
        return [allowed[i] for i in _spaced(0, len(allowed) - 1, per[part])] if per[part] else []
    idx = _spaced(0, len(allowed) - 1, per[part])
    return [allowed[min(len(allowed) - 1, i + step * 3)] for i in idx]


def _bbb(per: dict[str, int]) -> list[Triplet]:
    want = {(step, part): _bbb_centres(step, part, per) for step in STEPS for part in PARTS}
    needed = {c + d for (step, _), cs in want.items() for c in cs for d in range(-step, step + 1)}
    frames: dict[int, np.ndarray] = {}
    gen = imageio_ffmpeg.read_frames(str(FRAMES / "bbb" / "big_buck_bunny_0_30.webm"))
    w, h = next(gen)["size"]
    for i, raw in enumerate(gen):
        if i > max(needed):
            break
        if i in needed:
            img = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            frames[i] = cv2.resize(img, BBB_SIZE, interpolation=cv2.INTER_AREA)
    gen.close()
    return [Triplet("bbb", step, part, f"bbb/{c}k{step}", frames[c - step], frames[c], frames[c + step],
                    tuple(frames[c + d] for d in range(1 - step, step)))
            for (step, part), cs in want.items() for c in cs
            if not np.array_equal(frames[c], frames[c - step]) and not np.array_equal(frames[c], frames[c + step])]


def _gif(per: dict[str, int]) -> list[Triplet]:
    path = FRAMES / "cartoon_pigs_in_a_polka" / "pigs_in_a_polka.gif"
    with Image.open(path) as im:
        gif = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    out = []
    for step in STEPS:
        for part in ("tune", "report"):
            lo, hi = (step, GIF_SPLIT - 1 - step) if part == "tune" else (GIF_SPLIT + step, len(gif) - 1 - step)
            ok = [c for c in range(lo, hi + 1) if not np.array_equal(gif[c], gif[c - step])
                  and not np.array_equal(gif[c], gif[c + step])]
            chosen = [ok[i] for i in _spaced(0, len(ok) - 1, per[part])]
            parts = [(part, chosen)] + ([("fresh", [c for c in ok if c not in chosen])] if part == "report" else [])
            out += [Triplet("pigs_gif", step, name, f"pigs_gif/{c}k{step}", gif[c - step], gif[c], gif[c + step],
                            tuple(gif[c - step + 1:c + step]))
                    for name, cs in parts for c in cs]
    return out


def _sintel() -> list[Triplet]:
    out = []
    for folder in SINTEL:
        pngs = [_png(p) for p in sorted((FRAMES / folder).glob("*.png"))]
        for step in STEPS:
            for c in range(step, len(pngs) - step):
                out.append(Triplet("sintel", step, "report", f"{folder.removeprefix('sintel_')}/{c}k{step}",
                                   pngs[c - step], pngs[c], pngs[c + step], tuple(pngs[c - step + 1:c + step])))
    return out


def _chaplin(n: int, final: int = 0) -> list[Triplet]:
    """``n`` unseen triplets per step of the live-action clip's own frames (decoded duplicates dropped), and
    ``final`` more per step whose centres are not the unseen ones at the count that was looked at."""
    if n <= 0 and final <= 0:
        return []
    gen = imageio_ffmpeg.read_frames(str(FRAMES / "liveaction_chaplin" / "chaplin.mp4"))
    w, h = next(gen)["size"]
    frames: list[tuple[int, np.ndarray]] = []  # (raw index, frame), each film frame once
    for i, raw in enumerate(gen):
        img = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        if not frames or cv2.PSNR(frames[-1][1], img) <= DUPLICATE_PSNR:
            frames.append((i, img))
    gen.close()
    out = []
    for step in STEPS:
        ok = [c for c in range(step, len(frames) - step)
              if not any(frames[c + d][0] in EXCLUDED_CHAPLIN for d in range(-step, step + 1))]
        unseen = [ok[i] for i in _spaced(0, len(ok) - 1, n)] if n > 0 else []
        looked = {ok[i] for i in _spaced(0, len(ok) - 1, LOOKED_AT["unseen"])} | set(unseen)
        rest = [c for c in ok if c not in looked]
        later = [rest[i] for i in _spaced(0, len(rest) - 1, final)] if final > 0 else []
        for part, centres in (("unseen", unseen), ("final", later)):
            for c in centres:
                seq = [img for _, img in frames[c - step:c + step + 1]]
                out.append(Triplet("chaplin", step, part, f"chaplin/{frames[c][0]}k{step}", seq[0], seq[step],
                                   seq[-1], tuple(seq[1:-1])))
    return out


def triplets(per: int = 6, tune_per: int | None = None, fresh_per: int | None = None,
             unseen_per: int | None = None, final_per: int | None = None) -> list[Triplet]:
    """Every triplet of the sets: ``per`` per source, step and part (the GIF two thirds of it; Sintel:
    all it has); ``tune_per`` (default ``per``) instead for the tune part, where a denser sample makes
    the choices less a matter of which few pairs were drawn; ``fresh_per``, ``unseen_per`` and
    ``final_per`` (default ``2 * per`` each) bbb triplets per step of the fresh, unseen and final parts
    (unseen and final: as many chaplin triplets again; the fresh GIF: all that is left; 0: no such part)."""
    def n(x: int | None) -> int:
        return 2 * per if x is None else x

    bbb = {"tune": tune_per or per, "report": per, "fresh": n(fresh_per), "unseen": n(unseen_per),
           "final": n(final_per)}
    gif = {part: max(1, n * 2 // 3) for part, n in bbb.items() if part in ("tune", "report")}
    items = _bbb(bbb) + _gif(gif) + _sintel() + _chaplin(bbb["unseen"], bbb["final"])
    return [t for t in items if t.part != "fresh" or bbb["fresh"] > 0]


def groups(items: list[Triplet]) -> dict[tuple[str, str, int], list[Triplet]]:
    """(part, set, step) → its triplets, in a stable order."""
    out: dict[tuple[str, str, int], list[Triplet]] = {}
    for t in items:
        out.setdefault((t.part, t.set, t.step), []).append(t)
    return dict(sorted(out.items()))


if __name__ == "__main__":
    for (part, s, step), ts in groups(triplets()).items():
        print(f"{part:6s} {s:9s} k={step} {len(ts):2d} triplets  {', '.join(t.name for t in ts)}")
