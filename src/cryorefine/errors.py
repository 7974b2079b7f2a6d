"""The one error type users see."""

from __future__ import annotations

import string
from collections.abc import Mapping


class CryorefineError(Exception):
    """The input files or options are wrong.

    The message is one line that names the file or option and says what is wrong;
    ``cryorefine.cli.main`` prints it and exits with status 2. Any other exception is
    a bug and keeps its traceback. A message that quotes another library's multi-line
    error is folded onto one line.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class CryorefineWarning(UserWarning):
    """Something the user should know that does not stop the run (printed as one line)."""


class OptionError(CryorefineError):
    """Bad options of one stage, named by the command that was run.

    A stage's config cannot know how the command that made it spells its options
    (``classaverage --keep`` is ``refine --classkeep``), so the message is a
    ``template`` that writes each option as ``{field}`` (a field of the stage's config)
    and each value as ``{0}``, ``{1}`` ... (``values``, never read as a template).
    ``flags`` spells the fields as the stage's own command does; that is the message.
    A command that gives the stage's options other names raises :meth:`spelled` with
    its names instead.
    """

    def __init__(
        self, stage: str, flags: Mapping[str, str], template: str, *values: object
    ) -> None:
        self.stage = stage
        self.flags = dict(flags)
        self.template = template
        self.values = values
        super().__init__(template.format(*values, **self.flags))

    @property
    def fields(self) -> tuple[str, ...]:
        """The config fields the message names, in order."""
        named = (f for _, f, _, _ in string.Formatter().parse(self.template) if f)
        return tuple(dict.fromkeys(f for f in named if not f.isdigit()))

    def spelled(self, names: Mapping[str, str]) -> OptionError:
        """The same error with the options ``names`` (field -> option) spelled so."""
        return OptionError(self.stage, {**self.flags, **names}, self.template, *self.values)
