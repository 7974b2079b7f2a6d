"""EMAN2 modifier strings (``name:key=value:key=value``) and the registries they name.

Processors, comparators, aligners, averagers, reconstructors, projectors and
orientation generators are all chosen by such a string. Each kind has one
:class:`Registry`; an implementation registers itself with its parameters, so the
same table validates user input, fills defaults and prints ``cryorefine help KIND``.

A registry holds what the modules that define the implementations registered when they
were imported; it imports nothing itself (it sits below them). ``cryorefine.config``
imports every such module, so code above it sees complete registries.

Parsing follows EMAN2's ``parsemodopt``: the first ``:``-field is the name, every
further field is ``key=value``; a value is typed as int, then float, else string
(double quotes removed). ``true``/``false`` are accepted for ``1``/``0``. The string
``none`` (any case) means "disabled".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryorefine.errors import CryorefineError


@dataclass(frozen=True)
class Param:
    """One declared parameter: its name, type (int, float, bool, str), default, meaning."""

    name: str
    type: type
    help: str
    default: Any = None
    required: bool = False
    #: the value names a file that ``cryorefine.config`` reads once, when the option is
    #: parsed: ``"image"`` (a 2D image, e.g. a mask) or ``"strucfac"`` (a 1D power spectrum)
    file: str | None = None

    def coerce(self, value: Any, where: str) -> Any:
        """Convert a parsed value to this parameter's type, or raise a clear error."""
        t = self.type
        if t is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if value in (0, 1):
                return bool(value)
            raise CryorefineError(f"{where}: {self.name}={value!r} must be 0 or 1")
        if t is float and isinstance(value, int | float):
            return float(value)
        if t is int and isinstance(value, int):
            return value
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t is str:
            return str(value)
        raise CryorefineError(f"{where}: {self.name}={value!r} must be {t.__name__}")


@dataclass(frozen=True)
class Entry:
    """A registered object: its name, one-line help, parameters and implementation."""

    name: str
    help: str
    params: tuple[Param, ...]
    func: Callable[..., Any]
    check: Callable[[dict[str, Any], str], None] | None = None
    aliases: tuple[str, ...] = ()

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.name == key), None)


@dataclass(frozen=True)
class Modifier:
    """A parsed and validated modifier: the entry and the full, typed parameter dict."""

    entry: Entry
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the implementation; a parameter left unset (None) yields to ``kwargs``."""
        merged = dict(kwargs)
        merged.update({k: v for k, v in self.params.items() if v is not None or k not in kwargs})
        return self.entry.func(*args, **merged)

    def __str__(self) -> str:
        given = [f"{k}={v}" for k, v in self.params.items() if isinstance(v, str | int | float)]
        return ":".join([self.name, *given])


def _type_value(text: str) -> Any:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return int(text.lower() == "true")
    return text


def parse_modopt(text: str | None, *, option: str = "option") -> tuple[str, dict[str, Any]] | None:
    """Split ``name:key=value:...`` into ``(name, {key: typed value})``.

    Returns ``None`` for an empty string or ``none``. ``bdb:`` inside a value is kept.

    Raises
    ------
    CryorefineError
        For a field without exactly one ``=``, an empty key or an empty value.
    """
    if text is None or not text.strip() or text.strip().lower() == "none":
        return None
    protected = text.replace("bdb:", "\0").replace("BDB:", "\0")
    name, *fields_ = protected.split(":")
    params: dict[str, Any] = {}
    for fld in fields_:
        if fld.count("=") != 1:
            shown = fld.replace("\0", "bdb:")
            raise CryorefineError(f"{option}: '{shown}' in '{text}' must have the form key=value")
        key, value = fld.split("=")
        if not key:
            raise CryorefineError(f"{option}: empty key in '{text}'")
        if not value:
            raise CryorefineError(f"{option}: {key}= has no value in '{text}'")
        params[key] = _type_value(value.replace("\0", "bdb:"))
    if not name:
        raise CryorefineError(f"{option}: '{text}' has no name before the first ':'")
    return name.replace("\0", "bdb:"), params


class Registry:
    """All objects of one kind (e.g. processors), looked up by EMAN2 name."""

    def __init__(self, kind: str, singular: str) -> None:
        self.kind = kind
        self.singular = singular
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        help: str,
        params: tuple[Param, ...] = (),
        *,
        check: Callable[[dict[str, Any], str], None] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``func`` under ``name`` (and ``aliases``)."""

        def deco(func: Callable[..., Any]) -> Callable[..., Any]:
            entry = Entry(name, help, tuple(params), func, check, aliases)
            for key in (name, *aliases):
                if key in self._entries:
                    raise ValueError(f"{self.singular} {key!r} registered twice")
                self._entries[key] = entry
            return func

        return deco

    def entries(self) -> list[Entry]:
        """Every registered entry, sorted by name, each once."""
        unique = {e.name: e for e in self._entries.values()}
        return [unique[k] for k in sorted(unique)]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def help_list(self) -> str:
        """For a help text: the names registered (what ``cryorefine help KIND``
        details), so that the list cannot fall behind what is registered."""
        return f"{', '.join(self.names())}; see cryorefine help {self.kind}"

    def get(self, name: str, *, option: str = "option") -> Entry:
        """Look ``name`` up exactly, then lower-cased; raise listing valid names."""
        entry = self._entries.get(name) or self._entries.get(name.lower())
        if entry is None:
            valid = ", ".join(self.names()) or "none registered (import cryorefine.config)"
            raise CryorefineError(f"{option}: unknown {self.singular} '{name}'; valid: {valid}")
        return entry

    def parse(self, text: str | None, *, option: str = "option") -> Modifier | None:
        """Parse and validate a modifier string; ``None`` when empty or ``none``.

        Unknown names and keys, wrongly typed values and missing required parameters
        are errors that name ``option`` and list what is valid.
        """
        parsed = parse_modopt(text, option=option)
        if parsed is None:
            return None
        name, given = parsed
        entry = self.get(name, option=option)
        where = f"{option} {entry.name}"
        params: dict[str, Any] = {}
        for key, value in given.items():
            p = entry.param(key)
            if p is None:
                valid = ", ".join(q.name for q in entry.params) or "none"
                raise CryorefineError(f"{where}: unknown parameter '{key}'; valid: {valid}")
            params[key] = p.coerce(value, where)
        for p in entry.params:
            if p.name not in params:
                if p.required:
                    raise CryorefineError(f"{where}: parameter '{p.name}' is required")
                params[p.name] = p.default
        if entry.check is not None:
            entry.check(params, where)
        return Modifier(entry, params)


#: The registries, one per kind of EMAN2 object (filled by the modules that define them:
#: processors, align.compare, align.align2d, fourier.reconstruct, fourier.project,
#: geometry.orientations).
PROCESSORS = Registry("processors", "processor")
COMPARATORS = Registry("comparators", "comparator")
ALIGNERS = Registry("aligners", "aligner")
AVERAGERS = Registry("averagers", "averager")
RECONSTRUCTORS = Registry("reconstructors", "reconstructor")
PROJECTORS = Registry("projectors", "projector")
ORIENTGENS = Registry("orientgens", "orientation generator")

REGISTRIES: dict[str, Registry] = {
    r.kind: r
    for r in (PROCESSORS, COMPARATORS, ALIGNERS, AVERAGERS, RECONSTRUCTORS, PROJECTORS, ORIENTGENS)
}
