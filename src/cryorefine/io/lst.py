"""EMAN2 ``.lst`` particle lists (fixed-record ``#LSX`` format; ``#LST`` read too).

Record ``i`` is ``<n>\\t<path>[\\t<json>]`` padded with spaces to a fixed length: image
``n`` (0-based) of ``path``, with the JSON dict overriding that image's header
(``xform.projection``, ``ctf``, ``class``, ``score`` ...). Paths are written verbatim;
relative ones are resolved by the reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_output, is_file
from cryorefine.io.eman2 import EmanCtf, Transform

LSX_COMMENT = (
    "# This file is in fast LST format. All lines after the next line have exactly "
    "the number of characters shown on the next line. This MUST be preserved if "
    "editing."
)


@dataclass
class LstRecord:
    """One virtual image: index ``n`` (0-based) into ``path``, plus header overrides."""

    n: int
    path: str
    params: dict[str, Any] = field(default_factory=dict)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Transform | EmanCtf):
        return obj.to_json()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in an .lst record")


def _json_hook(obj: dict) -> Any:
    cls = obj.get("__class__")
    if cls == "Transform":
        return Transform.from_json(obj)
    if cls == "EMAN2Ctf":
        return EmanCtf.from_json(obj)
    return obj


def encode_record(rec: LstRecord) -> str:
    if any(c.isspace() for c in rec.path):
        raise CryorefineError(f"{rec.path}: an .lst path may not contain white space")
    line = f"{rec.n}\t{rec.path}"
    if rec.params:
        line += "\t" + json.dumps(
            rec.params, sort_keys=True, separators=(",", ":"), default=_json_default
        )
    return line


def write_lst(
    path: str | os.PathLike, records: Iterable[LstRecord], *, overwrite: bool = False
) -> Path:
    """Write records as a ``#LSX`` file (record length = longest + 5), atomically.

    ``records`` may be a generator: each is encoded as it comes, into a temporary file
    until the longest is known, so that a set of any size is never whole in memory."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        spool = tmp.with_name(f"{tmp.name}.lines")
        try:
            longest = 15
            with open(spool, "w", newline="\n", encoding="ascii") as fh:
                for rec in records:
                    line = encode_record(rec)
                    longest = max(longest, len(line))
                    fh.write(line + "\n")
            length = longest + 5
            with (
                open(spool, encoding="ascii") as lines,
                open(tmp, "w", newline="\n", encoding="ascii") as fh,
            ):
                fh.write(f"#LSX\n{LSX_COMMENT}\n# {length}\n")
                for line in lines:
                    fh.write(line.rstrip("\n").ljust(length - 1) + "\n")
        finally:
            spool.unlink(missing_ok=True)
    return Path(path)


def _decode_fields(parts: list[str], where: str) -> LstRecord:
    try:
        n = int(parts[0])
    except ValueError as exc:
        raise CryorefineError(f"{where}: image index {parts[0]!r} is not an integer") from exc
    if len(parts) < 2 or not parts[1]:
        raise CryorefineError(f"{where}: record has no file name")
    if n < 0:
        raise CryorefineError(f"{where}: image index {n} is negative")
    params: dict[str, Any] = {}
    if len(parts) > 2 and parts[2].strip().startswith("{"):
        try:
            value = json.loads(parts[2].strip(), object_hook=_json_hook)
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise CryorefineError(f"{where}: header overrides are not valid JSON ({exc})") from None
        params = value if isinstance(value, dict) else {"__default__": value}
    # a third field that is not JSON is 2013-style free text: an opaque comment
    return LstRecord(n, parts[1], params)


def read_lst(path: str | os.PathLike) -> list[LstRecord]:
    """Read a ``#LSX`` (or legacy ``#LST``) file into records."""
    path = Path(path)
    if not is_file(path):
        raise CryorefineError(f"{path}: no such file")
    raw = path.read_bytes()
    if b"\r" in raw:
        raise CryorefineError(f"{path}: contains carriage returns; .lst files need Unix newlines")
    text = raw.decode("ascii", errors="replace")
    if text.startswith("#LSX"):
        head = text.split("\n", 3)
        if len(head) < 3 or not head[2].startswith("#"):
            raise CryorefineError(f"{path}: truncated #LSX header")
        try:
            length = int(head[2][1:].strip())
        except ValueError as exc:
            raise CryorefineError(f"{path}: third line must be '# <record length>'") from exc
        body = head[3] if len(head) > 3 else ""
        if length < 2 or len(body) % length:
            raise CryorefineError(
                f"{path}: body of {len(body)} bytes is not a whole number of {length}-byte records"
            )
        records = []
        for i in range(len(body) // length):
            rec = body[i * length : (i + 1) * length].rstrip("\n").rstrip(" ")
            records.append(_decode_fields(rec.split("\t"), f"{path}: record {i}"))
        return records
    if text.startswith("#LST"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.startswith("#") or not line.strip():
                continue
            records.append(_decode_fields(line.split("\t"), f"{path}: line {lineno}"))
        return records
    raise CryorefineError(f"{path}: not an EMAN2 list file (first line must be #LSX or #LST)")
