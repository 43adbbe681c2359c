"""Shot-list YAML → ``Episode``, shots taken as written. Not a stage: ``stages.script``
dispatches ``.yaml``/``.yml`` here.

Format::

    title: The Lantern          # required
    characters: [MEI, KAI]      # optional; when given, every name used must be in it
    scenes:
      - heading: EXT. HARBOUR - DUSK
        location: HARBOUR       # optional, else parsed from the heading
        time_of_day: DUSK       # optional, else parsed from the heading
        shots:
          - duration: 3.5       # seconds, > 0
            camera: wide        # establishing | wide | medium | close-up | extreme-close-up
            characters: [MEI]
            action: Mei lifts the lantern.
            dialogue:
              - {character: MEI, text: "There.", parenthetical: quietly}
            static: false

Every error names the line of the offending YAML node, found by walking the composed node
tree along the pydantic error location.

Before the node tree is built, one pass over the parser's events refuses nesting deeper than
``max_depth`` (the composer recurses per level) and more than ``max_nodes`` values once
aliases are expanded (validation walks each alias as a copy, so a few lines of anchors can
stand for billions of values). The limits are the script stage's (``stages.script``).
"""
from __future__ import annotations

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.records import ScriptError
from stages.records import Camera, DialogueLine, Episode, Scene, Shot
from stages.fountain import parse_heading


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DialogueSpec(_Spec):
    character: str = Field(min_length=1)
    text: str = Field(min_length=1)
    parenthetical: str | None = None
    extension: str | None = None


class ShotSpec(_Spec):
    duration: float = Field(gt=0, description="Seconds.")
    camera: Camera
    characters: list[str] = Field(default_factory=list)
    action: str = ""
    dialogue: list[DialogueSpec] = Field(default_factory=list)
    static: bool = False


class SceneSpec(_Spec):
    heading: str
    location: str | None = None
    time_of_day: str | None = None
    shots: list[ShotSpec] = Field(min_length=1)


class ShotList(_Spec):
    title: str = Field(min_length=1)
    characters: list[str] = Field(default_factory=list)
    scenes: list[SceneSpec] = Field(min_length=1)


def format_loc(loc: tuple) -> str:
    """('scenes', 0, 'shots', 2, 'duration') → 'scenes[0].shots[2].duration'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def line_of(root: yaml.Node, loc: tuple) -> int:
    """1-based line of the node at ``loc``, or of its nearest existing parent (a missing key)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            found = node.value[part]
        else:
            found = None
        if found is None:
            break
        node = found
    return node.start_mark.line + 1


def _check_size(text: str, path: str, max_depth: int, max_nodes: int) -> None:
    """Refuse nesting past ``max_depth`` and more than ``max_nodes`` values (aliases expanded),
    naming the line where the limit is passed; YAML errors are left to the composer."""
    sizes: dict[str, int] = {}  # values under each anchor, aliases expanded
    open_: list[tuple[str | None, int]] = []  # per open collection: its anchor, the count before it
    total = 0  # values so far, aliases expanded
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(open_) >= max_depth:
                raise ScriptError(path, f"YAML nested more than {max_depth} deep; a shot list nests 7 deep",
                                  event.start_mark.line + 1)
            open_.append((event.anchor, total))
            total += 1
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, before = open_.pop()
            if anchor is not None:
                sizes[anchor] = total - before
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)  # an unknown anchor is the composer's error
        if total > max_nodes:
            raise ScriptError(path, f"YAML of more than {max_nodes:,} values (each alias counted as what it "
                                    "repeats)", event.start_mark.line + 1)


def read_shotlist(text: str, path: str, *, max_depth: int, max_nodes: int,
                  max_characters: int) -> tuple[ShotList, yaml.Node]:
    """Parse and validate shot-list YAML; returns the model and the node tree for line lookups.

    Raises ScriptError naming the line of the first problem.
    """
    try:
        _check_size(text, path, max_depth, max_nodes)
        loader = yaml.SafeLoader(text)  # compose once, build the data from that node tree
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # "but found another document" only makes sense after its context
        problem = f"{exc.context} {exc.problem}" if (exc.problem or "").startswith("but") else exc.problem
        raise ScriptError(path, f"invalid YAML: {problem or exc.context}",
                          mark.line + 1 if mark else None) from None
    if root is None:
        raise ScriptError(path, "no shot list in the file (expected title and scenes)")
    try:
        spec = ShotList.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:
            raise ScriptError(path, "expected a mapping with 'title' and 'scenes' at the top level",
                              1) from None
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ScriptError(path, f"{format_loc(err['loc'])}: {err['msg']}{more}",
                          line_of(root, err["loc"])) from None
    if len(spec.characters) > max_characters:
        raise ScriptError(path, f"characters: {len(spec.characters):,} names; an episode has at most "
                                f"{max_characters:,}", line_of(root, ("characters", max_characters)))
    if spec.characters:
        # a declared cast catches typos in names, which would otherwise draw a new figure
        for i, scene in enumerate(spec.scenes):
            for j, shot in enumerate(scene.shots):
                names = [(("characters", k), n) for k, n in enumerate(shot.characters)]
                names += [(("dialogue", k, "character"), d.character) for k, d in enumerate(shot.dialogue)]
                for sub, name in names:
                    if name not in spec.characters:
                        loc = ("scenes", i, "shots", j, *sub)
                        raise ScriptError(path, f"{format_loc(loc)}: '{name}' is not in the top-level "
                                                f"characters list {spec.characters}", line_of(root, loc))
    return spec, root


def load_shotlist(text: str, where: str, *, max_depth: int, max_nodes: int, max_characters: int) -> Episode:
    """Validated shot list → Episode; shots are taken as written, lines point at their nodes.

    The limits are passed by ``stages.script``, which checks the Episode against the rest.
    """
    spec, root = read_shotlist(text, where, max_depth=max_depth, max_nodes=max_nodes,
                               max_characters=max_characters)
    scenes = []
    for i, sc in enumerate(spec.scenes):
        setting, location, time_of_day = parse_heading(sc.heading, forced=False)
        shots = []
        for j, sh in enumerate(sc.shots):
            loc = ("scenes", i, "shots", j)
            dialogue = [DialogueLine(character=d.character, text=d.text, parenthetical=d.parenthetical,
                                     extension=d.extension, line=line_of(root, (*loc, "dialogue", k)))
                        for k, d in enumerate(sh.dialogue)]
            shots.append(Shot(id=f"sc{i + 1:02d}-sh{j + 1:02d}", scene=i + 1, camera=sh.camera,
                              duration_s=sh.duration, characters=sh.characters, action=sh.action,
                              dialogue=dialogue, static=sh.static, line=line_of(root, loc)))
        scenes.append(Scene(index=i + 1, heading=sc.heading, location=sc.location or location or "UNTITLED",
                            setting=setting, time_of_day=(sc.time_of_day or time_of_day).upper(),
                            line=line_of(root, ("scenes", i)), shots=shots))
    cast = spec.characters or list(dict.fromkeys(
        name for sc in spec.scenes for sh in sc.shots
        for name in [*sh.characters, *(d.character for d in sh.dialogue)]))
    return Episode(title=spec.title, source=where, characters=cast, scenes=scenes)
