"""Staging: who stands where and how the camera frames them. A character's look
(``character_style``), the moves read from the action text (``parse_moves``), each
character's placement at a moment of the shot (``layout``), and the virtual camera
(``frame_camera``). Decides, draws nothing.

Not a stage: ``stages.draw`` draws what this decides, and ``stages.storyboard`` and
``stages.diffusion`` reuse the layout and camera. Every "random" choice is a sha256 of
names (``stable_hash``), never a global RNG or Python's salted ``hash()``.

Positions are in *world* coordinates (pixels of the full frame at the target size, ground
line near the bottom); the camera (scale + centre) shows them, so one layout serves every
framing from establishing shot to extreme close-up.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stages.records import Camera, Shot, SpokenLine

RGB = tuple[int, int, int]


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts; identical in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


# --------------------------------------------------------------------------- characters

HAIR: tuple[RGB, ...] = ((40, 34, 48), (104, 66, 44), (240, 204, 112), (244, 150, 184), (78, 122, 214),
                         (214, 218, 232), (200, 62, 52), (134, 92, 186), (72, 154, 112), (238, 132, 62))
HAIR_SHAPES = ("short", "spiky", "long", "bob", "ponytail", "twintails")
SKIN: tuple[RGB, ...] = ((255, 228, 210), (250, 214, 186), (236, 190, 152), (204, 154, 114))
EYES: tuple[RGB, ...] = ((70, 110, 200), (120, 70, 40), (60, 150, 110), (170, 60, 80), (130, 80, 190), (200, 140, 40))
TOPS: tuple[RGB, ...] = ((236, 236, 240), (220, 70, 70), (60, 100, 180), (250, 200, 80), (90, 170, 120), (240, 150, 170),
                         (70, 70, 90), (150, 110, 200), (250, 140, 60), (100, 190, 210), (180, 40, 90), (160, 140, 110))
BOTTOMS: tuple[RGB, ...] = ((50, 60, 100), (60, 60, 64), (130, 100, 80), (40, 90, 140), (120, 40, 50), (200, 190, 170))


@dataclass(frozen=True)
class CharacterStyle:
    """How a character is drawn; a pure function of the name."""

    hair: RGB
    hair_shape: str
    skin: RGB
    eyes: RGB
    top: RGB
    bottom: RGB
    skirt: bool
    height: float  # relative to the standard figure, 0.9 … 1.06


def character_style(name: str) -> CharacterStyle:
    """Stable per name: a sha256 of the name picks hair, skin, eyes, outfit and height."""
    h = stable_hash("character", name.strip().upper())
    pick = lambda seq, shift: seq[(h >> shift) % len(seq)]  # noqa: E731
    return CharacterStyle(
        hair=pick(HAIR, 0), hair_shape=pick(HAIR_SHAPES, 8), skin=pick(SKIN, 16), eyes=pick(EYES, 20),
        top=pick(TOPS, 28), bottom=pick(BOTTOMS, 36), skirt=bool((h >> 44) & 1),
        height=0.9 + 0.16 * ((h >> 48) % 1000) / 999,
    )


@dataclass(frozen=True)
class Placement:
    """A character at one moment, in world pixels: feet centre (x, ground), figure height."""

    name: str
    x: float
    ground: float
    height: float
    facing: int  # +1 looks screen-right, -1 screen-left
    lift: float = 0.0  # jump height above ground
    stride: float = 0.0  # leg swing, radians
    arm: float = 0.0  # arm swing, radians
    bob: float = 0.0  # breathing offset, pixels
    mouth: float = 0.0  # 0 closed … 1 wide open
    speaking: bool = False

    @property
    def unit(self) -> float:
        """One head height in world pixels (figures are 5.6 heads tall)."""
        return self.height / 5.6


_MOVES = (  # (kind, pattern) — first match in a clause wins, so specific verbs come first
    ("enter", r"\b(enters?|entering|arrives?|comes? in|walks? in|runs? in)\b|进来|走进|跑进|进入|来到"),
    ("leave", r"\b(leaves?|leaving|exits?|walks? (away|off|out)|runs? (away|off|out)|storms? out|departs?)\b|离开|走出|跑出|出去|离去"),
    ("approach", r"\b(approach(es)?|(walks?|steps?|runs?|moves?) (toward|towards|to|up to)|comes? closer)\b|走向|跑向|靠近|接近|走近"),
    ("move", r"\b(walks?|walking|walked|runs?|running|ran|steps?|strolls?|paces?|crosses|moves?|dash(es)?|sprints?|rush(es)?|chases?|hurr(y|ies))\b|走|跑|奔|冲|追"),
)
_RUN = re.compile(r"\b(run|runs|running|ran|dash|dashes|sprints?|rush|rushes|chases?|hurr(y|ies))\b|跑|奔|冲|追", re.I)
_JUMP = re.compile(r"\b(jumps?|jumping|leaps?|hops?)\b|跳", re.I)
_TURN = re.compile(r"\b(turns?|turning|spins?|whirls?)\b|转身|回头|转过", re.I)
_GROUP = re.compile(r"\b(they|everyone|both|all)\b|他们|她们|大家|两人|众人", re.I)


@dataclass(frozen=True)
class _Move:
    kind: str  # enter | leave | approach | move | none
    run: bool = False
    jump: bool = False
    turn: bool = False
    side: int = 0  # -1 left, +1 right, 0 unspecified


def parse_moves(shot: Shot) -> dict[str, _Move]:
    """Who moves how, from the action text: clause by clause, the subject is the first named
    character in the clause, else everyone for 'they'/他们, else the previous subject."""
    names = list(dict.fromkeys(shot.characters))
    moves: dict[str, _Move] = {}
    subject: list[str] = names[:1]
    for clause in re.split(r"[.!?;。！？；\n]+", shot.action):
        low = clause.lower()
        named = sorted((low.find(n.lower()), n) for n in names if n.lower() in low)
        if named:
            subject = [named[0][1]]
        elif _GROUP.search(clause):
            subject = names
        kind = next((k for k, pat in _MOVES if re.search(pat, clause, re.I)), "none")
        run, jump, turn = bool(_RUN.search(clause)), bool(_JUMP.search(clause)), bool(_TURN.search(clause))
        if kind == "none" and not (jump or turn):
            continue
        side = -1 if re.search(r"\bleft\b|左", clause, re.I) else 1 if re.search(r"\bright\b|右", clause, re.I) else 0
        for name in subject:
            old = moves.get(name, _Move("none"))
            moves[name] = _Move(kind if kind != "none" else old.kind, old.run or run, old.jump or jump,
                                old.turn or turn, side or old.side)
    return moves


def speakers(shot: Shot) -> list[str]:
    """The shot's on-screen characters who speak in it, in order of appearance (upper-case
    names as cues match them). Two or more make a two-shot: the camera frames all of them."""
    spoken = {line.character.strip().upper() for line in shot.dialogue}
    return [n for n in dict.fromkeys(shot.characters) if n.strip().upper() in spoken]


def _speaker_at(shot: Shot, t: float) -> str | None:
    if not shot.dialogue:
        return None
    line = shot.dialogue[min(int(t * len(shot.dialogue)), len(shot.dialogue) - 1)]
    return line.character.strip().upper()


def layout(shot: Shot, *, t: float, width: int, height: int, speech: Sequence[SpokenLine] = (),
           duration_s: float | None = None) -> list[Placement]:
    """Where each on-screen character stands at time ``t`` (0 … 1 of the shot), in world pixels.

    Characters spread across the frame; verbs in the action move them (walk, run, enter,
    leave, approach, jump, turn — and 走/跑/进/离开/转身); everyone else breathes and sways a
    little so in-betweening has real motion. Speakers face each other; the current speaker's
    mouth opens and closes with t — with the measured speech envelope when ``speech`` is given
    (``duration_s``: the shot's length in the cut). A static shot is frozen at t = 0.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"layout: t must be within 0..1, got {t}")
    names = list(dict.fromkeys(shot.characters))
    if not names:
        return []
    t = 0.0 if shot.static else t
    W, H, n = float(width), float(height), len(names)
    fig_h, ground = min(H * 0.36, W * 0.5), H * (0.9 if W >= H else 0.84)
    if n == 2 and len(speakers(shot)) == 2:  # a two-shot: the pair stands close enough to share the frame
        slots = [0.45, 0.55] if W >= H else [0.4, 0.6]
    else:
        slots = [0.5] if n == 1 else ([0.38, 0.62] if W >= H else [0.3, 0.7]) if n == 2 else list(np.linspace(0.18, 0.82, n))
    home = [W * (s + 0.03 * ((stable_hash("slot", shot.id, nm) % 201) / 100 - 1)) for s, nm in zip(slots, names)]
    moves = parse_moves(shot)
    speaker = _speaker_at(shot, t)

    # 1. path of each character: start and end x
    paths: list[tuple[float, float]] = []
    for i, name in enumerate(names):
        mv, x0 = moves.get(name, _Move("none")), home[i]
        edge = (-1 if x0 < W / 2 else 1) if mv.side == 0 else mv.side
        off = W / 2 + edge * (W / 2 + fig_h * 0.3)
        dist = W * (0.45 if mv.run else 0.22)
        if mv.kind == "enter":
            paths.append((off, x0))
        elif mv.kind == "leave":
            paths.append((x0, off))
        elif mv.kind == "approach":
            others = [home[j] for j in range(n) if j != i]
            target = min(others, key=lambda o: abs(o - x0)) if others else W / 2
            gap = math.copysign(fig_h * 0.45, x0 - target) if others else 0.0
            end = target + gap if abs(target - x0) > abs(gap) + W * 0.04 else x0 + math.copysign(W * 0.03, target - x0 or 1)
            paths.append((x0, end))
        elif mv.kind == "move":
            way = mv.side or (1 if x0 < W / 2 else -1) if n > 1 else mv.side or (1 if stable_hash("way", shot.id) & 1 else -1)
            paths.append((x0 - way * dist / 2, x0 + way * dist / 2))
        else:
            paths.append((x0, x0))

    # 2. pose at t
    out: list[Placement] = []
    xs = [a + (b - a) * t for a, b in paths]
    for i, name in enumerate(names):
        style, mv = character_style(name), moves.get(name, _Move("none"))
        h = fig_h * style.height
        phase = (stable_hash("phase", shot.id, name) % 1000) / 1000
        a, b = paths[i]
        travel = abs(b - a) * t
        if abs(b - a) > 1e-6:
            facing = 1 if b > a else -1
            swing = (0.6 if mv.run else 0.38) * math.sin(2 * math.pi * (travel / (0.55 * h) + phase))
            x, bob = xs[i], abs(swing) * h * 0.02
        else:
            others = [xs[j] for j in range(n) if j != i]
            facing = (1 if sum(others) / len(others) > xs[i] else -1) if others else (1 if stable_hash("face", name) & 1 else -1)
            breath = math.sin(2 * math.pi * (t * max(shot.duration_s, 1.0) / 2.5 + phase))
            swing, x, bob = 0.08 * breath, xs[i] + W * 0.008 * breath, h * 0.012 * breath
        if mv.turn and t >= 0.5:
            facing = -facing
        lift = h * 0.3 * math.sin(math.pi * t) if mv.jump else 0.0
        speaking = speaker is not None and speaker == name.strip().upper()
        mouth = 0.5 + 0.5 * math.sin(2 * math.pi * (t * shot.duration_s * 3.0 + phase)) if speaking else 0.0
        if speech:  # the voice as measured: open as loud as the line is now, shut between lines
            at = t * (duration_s or shot.duration_s)
            levels = [v for ln in speech if ln.character.strip().upper() == name.strip().upper()
                      if (v := ln.level(at)) is not None]
            speaking, mouth = bool(levels), max(levels, default=0.0)
        out.append(Placement(name, x, ground, h, facing, lift, swing, -swing * 0.8, bob, mouth, speaking))
    return out


# --------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class View:
    """A virtual camera: world point (cx, cy) lands in the frame centre, magnified by scale.
    The plate has its own, damped, camera (pscale, pcx, pcy) for multiplane parallax."""

    scale: float
    cx: float
    cy: float
    pscale: float
    pcx: float
    pcy: float
    blur: float = 0.0

    def to_screen(self, x: float, y: float, width: int, height: int) -> tuple[float, float]:
        return (x - self.cx) * self.scale + width / 2, (y - self.cy) * self.scale + height / 2


def focus_character(shot: Shot) -> str | None:
    """The first on-screen speaker, else the first character: who a close-up shows."""
    on = {n.strip().upper(): n for n in shot.characters}
    for line in shot.dialogue:
        if line.character.strip().upper() in on:
            return on[line.character.strip().upper()]
    return shot.characters[0] if shot.characters else None


def frame_camera(shot: Shot, placements: list[Placement], *, width: int, height: int) -> View:
    """Framing from the shot type: establishing shows the whole world; wide a little closer;
    medium the group from the waist up; close-up head and shoulders of the focus character
    at ~60 % of the height; extreme close-up the face. A shot in which two or more on-screen
    characters speak is a two-shot at medium and closer: every speaker in frame, as tight as
    the type asks where they fit, wider where they do not."""
    W, H = float(width), float(height)
    cam = shot.camera
    s, cx, cy, k, blur = 1.0, W / 2, H / 2, 1.0, 0.0
    focus = focus_character(shot)
    lead = next((p for p in placements if p.name == focus), None)
    talking = {n.strip().upper() for n in speakers(shot)}
    pair = [p for p in placements if p.name.strip().upper() in talking]
    if len(pair) >= 2 and cam in (Camera.MEDIUM, Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP):
        # heads to hips (medium) or heads and shoulders (closer) of every speaker, over their whole path
        u = max(p.unit for p in pair)
        rows = 2.9 if cam == Camera.MEDIUM else 1.9
        left, right = min(p.x for p in pair) - 1.3 * u, max(p.x for p in pair) + 1.3 * u
        s = max(1.0, min(0.8 * 0.9 * H / (rows * u), 0.96 * W / (right - left)))
        top = min(p.ground - p.lift - p.height * 1.02 for p in pair)
        cx, cy, k = (left + right) / 2, top + (0.5 - 0.07) * H / s, 0.4
    elif cam == Camera.WIDE:
        s, cy = 1.18, H - H / (2 * 1.18)  # fixed camera: movement reads on screen
    elif cam == Camera.MEDIUM and placements:
        # waist up (a little looser), centred on the group if it fits, else the focus pair
        u = max(p.unit for p in placements)
        s = 0.8 * 0.9 * H / (2.9 * u)
        fx = lead.x if lead else placements[0].x
        near = sorted(placements, key=lambda p: abs(p.x - fx))
        for group in (placements, near[:2], near[:1]):
            left, right = min(p.x for p in group) - 1.1 * u, max(p.x for p in group) + 1.1 * u
            if (right - left) * s <= W or len(group) == 1:
                break
        top = min(p.ground - p.lift - p.height * 1.02 for p in group)
        cx, cy, k = (left + right) / 2, top + (0.5 - 0.07) * H / s, 0.4
    elif cam == Camera.CLOSE_UP and lead:
        u = lead.unit
        s = min(0.6 * H / (1.4 * u), 0.85 * W / (1.5 * u))
        top = lead.ground - lead.lift - 5.7 * u
        cx, cy, k, blur = lead.x + lead.facing * 0.12 * W / s, top + (0.5 - 0.16) * H / s, 0.35, 0.004
    elif cam == Camera.EXTREME_CLOSE_UP and lead:
        u = lead.unit
        s = min(1.05 * H / u, 1.4 * W / u)
        cx, cy, k, blur = lead.x + lead.facing * 0.08 * u, lead.ground - lead.lift - 4.9 * u, 0.3, 0.008
    elif cam in (Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP, Camera.MEDIUM):
        s, k = {Camera.MEDIUM: 1.4, Camera.CLOSE_UP: 2.0}.get(cam, 3.0), 1.0
    ps = 1.0 + (s - 1.0) * k
    pcx = min(max(W / 2 + (cx - W / 2) * k, W / (2 * ps)), W - W / (2 * ps))
    pcy = min(max(H / 2 + (cy - H / 2) * k, H / (2 * ps)), H - H / (2 * ps))
    if k == 1.0:
        cx, cy = pcx, pcy  # figures and plate share one camera: feet stay on the ground
    return View(s, cx, cy, ps, pcx, pcy, blur * H)


def figure_box(p: Placement, view: View, width: int, height: int) -> tuple[float, float, float, float]:
    """The screen box (x0, y0, x1, y1) a figure is drawn in: 2.2 heads either side of its feet,
    from above its hair to just below its feet (the box ``stages.draw`` draws it inside)."""
    u = p.unit
    x0, y0 = view.to_screen(p.x - 2.2 * u, p.ground - p.lift - 6.2 * u, width, height)
    x1, y1 = view.to_screen(p.x + 2.2 * u, p.ground + 0.3 * u, width, height)
    return x0, y0, x1, y1


def figure_extent(p: Placement, view: View, width: int, height: int) -> tuple[float, float, float, float]:
    """The screen box of what a figure shows of itself: its body and head, less the box's margins
    (0.8 heads either side, from the top of the hair to the feet): what must be in frame for the
    character to be seen."""
    u = p.unit
    x0, y0 = view.to_screen(p.x - 0.8 * u, p.ground - p.lift - 5.7 * u, width, height)
    x1, y1 = view.to_screen(p.x + 0.8 * u, p.ground - p.lift, width, height)
    return x0, y0, x1, y1


# --------------------------------------------------------------------------- title cards


def safe_area(width: int, height: int) -> tuple[float, float, float, float]:
    """Where on-screen text goes (x0, y0, x1, y1): 16:9 keeps the 90 % title-safe area
    (EBU R 95); 9:16 also keeps clear of what short-video apps lay over the picture (the status
    and search bar on top, the caption, music line and buttons below, the button column on the
    right), symmetric so centred text stays centred."""
    W, H = float(width), float(height)
    if W >= H:
        return 0.05 * W, 0.05 * H, 0.95 * W, 0.95 * H
    return 0.12 * W, 0.15 * H, 0.88 * W, 0.72 * H
