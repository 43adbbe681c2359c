"""The project's exceptions: one base class, a few precise kinds.

Every message names the file (and line, where there is one) and the problem, and says what
state was left behind, so the CLI can print it as one line without a traceback.
"""
from __future__ import annotations


class AnimError(Exception):
    """Base of every error the pipeline reports to a user."""


class ScriptError(AnimError):
    """A screenplay or shot list that cannot be turned into an episode."""

    def __init__(self, path: str, problem: str, line: int | None = None):
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {problem}")


class ProfileError(AnimError):
    """A profile file or override that does not describe a valid render."""


class StageError(AnimError):
    """A stage failed while rendering; carries a failed subprocess's stderr when there is one."""

    def __init__(self, stage: str, shot: str | None, problem: str, stderr: str = ""):
        self.stage, self.shot, self.problem, self.stderr = stage, shot, problem, stderr
        where = f"{stage}[{shot}]" if shot else stage
        tail = f"\n{stderr.strip()[-2000:]}" if stderr.strip() else ""
        super().__init__(f"{where}: {problem}{tail}")
