"""User-facing errors.

Every message a user sees answers three questions: what is wrong, where (file, line,
field or config key) and how to fix it.  The CLI prints `LorakitError`s without a
traceback and exits 2; anything else is a bug in lorakit and keeps its traceback.
"""

from __future__ import annotations


class LorakitError(Exception):
    """A mistake the user can fix: bad config, bad data row, missing file or extra."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, where: str | None = None):
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n  fix: {self.hint}" if self.hint else head


class ConfigError(LorakitError):
    """One or more invalid config keys or values; all problems are reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f"config {source}" if source else "config"
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg, where=where)


class TrainingStopped(LorakitError):
    """Training began and stopped early (out of memory, a non-finite loss): the run folder records
    what happened, so whoever runs the stage can still draw its report."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (Ctrl-C, SIGTERM) after the step under way, with a checkpoint
    saved. A KeyboardInterrupt, so every layer that lets Ctrl-C through still does (a sweep marks
    its trial interrupted); its text says where the run can continue from."""


class DataError(LorakitError):
    """A dataset file or row that cannot be used; `where` names file, line and field."""


class ModelError(LorakitError):
    """A model, tokenizer or LoRA setting that does not fit the chosen base model."""


class MissingExtraError(LorakitError):
    """An optional dependency is not installed; the hint is the exact install command."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed",
            hint=f"pip install 'lorakit[{extra}]'",
        )
