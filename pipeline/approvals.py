"""Storyboard approvals, kept in the artifact store beside the panels they approve.

An approval is addressed by the content key of the storyboard panel it approves, so it
follows the shot's content: edit the shot and its panel changes key, and the approval lapses
until the new panel is approved. With ``approval_gate = true`` in the profile, a render
spends keyframe money only on approved shots.
"""
from __future__ import annotations

import getpass
import json
import time

from pipeline.store import Store
from pipeline.models import RenderPlan, ShotPlan
from pipeline.plan import content_key

VERSION = "1"


def approval_key(storyboard_key: str) -> str:
    return content_key("approval", VERSION, {}, [storyboard_key])


def approve(store: Store, shots: list[ShotPlan], *, by: str | None = None) -> None:
    who = by or getpass.getuser()
    for shot in shots:
        with store.writer(approval_key(shot.keys["storyboard"]), {"stage": "approval", "shot": shot.shot.id}) as d:
            (d / "approval.json").write_text(json.dumps({"shot": shot.shot.id, "by": who, "at": time.time(),
                                                         "storyboard_key": shot.keys["storyboard"]}))


def approved_keys(store: Store, plan: RenderPlan) -> set[str]:
    """Storyboard keys of the plan's shots that carry an approval."""
    return {s.keys["storyboard"] for s in plan.shots if store.get(approval_key(s.keys["storyboard"])) is not None}
