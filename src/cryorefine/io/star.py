"""RELION STAR particle files, 3.0 style (per-particle optics) and 3.1+ (``data_optics``).

Reading converts RELION's columns into :class:`ParticleMetadata`; writing produces
RELION 3.1 style with ``# version 30001``. ``rlnImageName`` is ``NNN@path`` with a
1-based ``NNN``; a relative ``path`` is looked up beside the STAR file first, then in
the project folder (default: the working directory, where RELION itself looks).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryorefine.errors import CryorefineError
from cryorefine.fourier.ctf import CTFParams
from cryorefine.geometry.euler import matrices_to_relion, relion_to_matrices
from cryorefine.io.atomic import atomic_output, is_file
from cryorefine.io.metadata import ParticleMetadata

_OPTICS = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnImageSize",
    "rlnImageDimensionality",
)
#: optics values written when the particles have no CTF (RELION requires the columns)
DEFAULT_VOLTAGE_KV, DEFAULT_CS_MM, DEFAULT_AMPLITUDE_CONTRAST = 300.0, 2.7, 0.1
_USED = {
    "rlnImageName",
    "rlnOpticsGroup",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnRandomSubset",
    "rlnClassNumber",
    *_OPTICS,
}


#: our column of a per-image weight (a class average's ``ptcl_repr``), read as the weight
WEIGHT_COLUMN = "crPtclRepr"


def read_star_blocks(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All blocks of a STAR file as DataFrames (a clear error for unreadable files)."""
    path = Path(path)
    if not is_file(path):
        raise CryorefineError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise CryorefineError(f"{path}: not a readable STAR file ({exc})") from exc
    blocks = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if not blocks:
        raise CryorefineError(f"{path}: no data table found in the STAR file")
    return blocks


def _particle_block(blocks: dict[str, pd.DataFrame], path: Path) -> pd.DataFrame:
    for name in ("particles", "images", ""):
        if name in blocks and "rlnImageName" in blocks[name].columns:
            return blocks[name]
    for df in blocks.values():
        if "rlnImageName" in df.columns:
            return df
    raise CryorefineError(
        f"{path}: no rlnImageName column; a particle STAR file needs one "
        f"(blocks: {', '.join(k or 'data_' for k in blocks)})"
    )


def _column(
    df: pd.DataFrame, name: str, default: float, path: Path, *, integer: bool = False
) -> np.ndarray:
    """A numeric column as float64, ``default`` where the file has no such column.

    Raises
    ------
    CryorefineError
        Naming the file, the particle (1-based row) and the column, for a value that is
        not a finite number (or, with ``integer``, not a whole number).
    """
    if name not in df.columns:
        return np.full(len(df), default, dtype=np.float64)
    raw = df[name]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.where(bad, False, values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "a whole number" if integer else "a finite number"
        raise CryorefineError(f"{path}: particle {i + 1}: {name} {raw.iloc[i]!r} is not {kind}")
    return values


def _resolve(names: np.ndarray, star_dir: Path, root: Path, path: Path) -> np.ndarray:
    out = np.empty(len(names), dtype=object)
    uniq, inverse = np.unique(names, return_inverse=True)
    for j, name in enumerate(uniq):
        name = str(name)
        if name.endswith(":mrcs"):
            name = name[:-5]
        p = Path(name)
        candidates = [p] if p.is_absolute() else [star_dir / p, root / p]
        found = next((c for c in candidates if is_file(c)), None)
        if found is None:
            raise CryorefineError(
                f"{path}: image file {name} not found (looked in "
                f"{' and '.join(str(c.parent) for c in candidates)})"
            )
        out[inverse == j] = str(found.resolve())
    return out


def parse_image_names(names: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split ``NNN@file`` into 0-based indices and file names (bare file: index 0)."""
    names = np.asarray(names, dtype=str)
    has_at = np.char.find(names, "@") >= 0
    parts = np.char.partition(names, "@")
    files = np.where(has_at, parts[:, 2], names)
    idx_text = np.where(has_at, parts[:, 0], "1")
    try:
        idx = idx_text.astype(np.int64) - 1
    except ValueError as exc:
        raise CryorefineError(f"{path}: rlnImageName must look like 000001@stack.mrcs") from exc
    if np.any(idx < 0):
        raise CryorefineError(f"{path}: rlnImageName indices are 1-based; found 0 or less")
    return idx, files


def read_particle_star(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None
) -> ParticleMetadata:
    """Read a RELION particle STAR file (3.0 or 3.1 style) into metadata.

    Pixel sizes that the file does not give are 0.0 (the caller decides). Image file
    names are resolved to absolute paths.

    Raises
    ------
    CryorefineError
        Missing file, no ``rlnImageName``, unknown optics group, CTF columns without
        voltage/Cs, a missing image file.
    """
    path = Path(path)
    root = Path.cwd() if root is None else Path(root)
    blocks = read_star_blocks(path)
    parts = _particle_block(blocks, path).reset_index(drop=True)
    n = len(parts)
    if n == 0:
        raise CryorefineError(f"{path}: the particle table has no particles (no rows)")
    optics = blocks.get("optics")
    per = parts.copy()
    optics_extra: dict[str, np.ndarray] = {}
    if optics is not None and "rlnOpticsGroup" in optics.columns:
        if "rlnOpticsGroup" not in parts.columns:
            raise CryorefineError(
                f"{path}: data_optics is present but particles have no rlnOpticsGroup column"
            )
        optics_ids = _column(optics, "rlnOpticsGroup", 0, path, integer=True).astype(int)
        groups = optics.set_index(optics_ids)
        if groups.index.has_duplicates:
            raise CryorefineError(f"{path}: data_optics defines an rlnOpticsGroup twice")
        gid = _column(parts, "rlnOpticsGroup", 0, path, integer=True).astype(int)
        missing = sorted(set(gid) - set(groups.index))
        if missing:
            raise CryorefineError(
                f"{path}: particles refer to optics group(s) {missing} "
                "that data_optics does not define"
            )
        for col in groups.columns:
            values = groups[col].reindex(gid).to_numpy()
            if col in _OPTICS:
                per[col] = values
            elif col != "rlnOpticsGroup":
                optics_extra[col] = values
    idx, files = parse_image_names(parts["rlnImageName"].to_numpy(dtype=str), path)
    meta = ParticleMetadata.empty(n, source_index=idx)
    meta.source_path = _resolve(files, path.parent, root, path)
    meta.optics_extra = optics_extra

    apix = _column(per, "rlnImagePixelSize", np.nan, path)
    if np.isnan(apix).any() and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(per.columns):
        alt = (
            1e4
            * _column(per, "rlnDetectorPixelSize", np.nan, path)
            / _column(per, "rlnMagnification", np.nan, path)
        )
        apix = np.where(np.isnan(apix), alt, apix)
    meta.apix = np.where(np.isfinite(apix), apix, 0.0)

    if "rlnDefocusU" in per.columns:
        need = [c for c in ("rlnVoltage", "rlnSphericalAberration") if c not in per.columns]
        if need:
            raise CryorefineError(
                f"{path}: has rlnDefocusU but no {' or '.join(need)}; the CTF needs them"
            )
        u = _column(per, "rlnDefocusU", np.nan, path)
        meta.ctf = CTFParams(
            u,
            _column(per, "rlnDefocusV", np.nan, path) if "rlnDefocusV" in per.columns else u,
            _column(per, "rlnDefocusAngle", 0.0, path),
            _column(per, "rlnVoltage", np.nan, path),
            _column(per, "rlnSphericalAberration", np.nan, path),
            _column(per, "rlnAmplitudeContrast", 0.1, path),
            _column(per, "rlnPhaseShift", 0.0, path),
            _column(per, "rlnCtfBfactor", 0.0, path),
            _column(per, "rlnCtfScalefactor", 1.0, path),
        )
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if any(c in per.columns for c in angle_cols):
        meta.rotations = relion_to_matrices(*(_column(per, c, 0.0, path) for c in angle_cols))
    if "rlnOriginXAngst" in per.columns or "rlnOriginYAngst" in per.columns:
        origin = np.stack(
            [
                _column(per, "rlnOriginXAngst", 0.0, path),
                _column(per, "rlnOriginYAngst", 0.0, path),
            ],
            axis=1,
        )
    else:
        origin = (
            np.stack(
                [_column(per, "rlnOriginX", 0.0, path), _column(per, "rlnOriginY", 0.0, path)],
                axis=1,
            )
            * meta.apix[:, None]
        )
    meta.shift_a = -origin
    if "rlnClassNumber" in per.columns:
        classes = _column(per, "rlnClassNumber", 0, path, integer=True)
        meta.class_number = classes.astype(np.int64) - 1
    if "rlnRandomSubset" in per.columns:
        halves = _column(per, "rlnRandomSubset", 0, path, integer=True).astype(np.int64)
        bad = ~np.isin(halves, (0, 1, 2))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryorefineError(
                f"{path}: particle {i + 1}: rlnRandomSubset {halves[i]} is not 1 or 2"
            )
        meta.half_set = halves
    if WEIGHT_COLUMN in per.columns:  # class averages: the particles each holds
        meta.weight = _column(per, WEIGHT_COLUMN, 1.0, path)
        if (meta.weight < 0).any():
            i = int(np.flatnonzero(meta.weight < 0)[0])
            raise CryorefineError(f"{path}: particle {i + 1}: {WEIGHT_COLUMN} is negative")
    meta.extra = {c: parts[c].to_numpy() for c in parts.columns if c not in _USED}
    return meta


def particles_star_text(
    meta: ParticleMetadata, image_names: list[str] | np.ndarray, box: int
) -> str:
    """RELION 3.1 STAR text (``data_optics`` + ``data_particles``) for ``meta``."""
    n = len(meta)
    ctf = meta.ctf
    known = ctf.known
    if known.any() and not known.all():
        raise CryorefineError(
            "some particles have CTF parameters and others not; a STAR file cannot say so"
        )
    has_ctf = bool(known.all()) and n > 0
    if np.any(meta.apix <= 0):
        raise CryorefineError(
            "particles without a pixel size cannot be written to STAR; pass --apix"
        )
    # optics groups: unique combinations, numbered by first appearance
    keys = {"rlnImagePixelSize": meta.apix}
    if has_ctf:
        keys.update(
            rlnVoltage=ctf.voltage_kv,
            rlnSphericalAberration=ctf.cs_mm,
            rlnAmplitudeContrast=ctf.amplitude_contrast,
        )
    else:  # RELION 3.1 refuses optics groups without them; unused without defocus columns
        keys.update(
            rlnVoltage=np.full(n, DEFAULT_VOLTAGE_KV),
            rlnSphericalAberration=np.full(n, DEFAULT_CS_MM),
            rlnAmplitudeContrast=np.full(n, DEFAULT_AMPLITUDE_CONTRAST),
        )
    extra_optics = {k: v for k, v in meta.optics_extra.items() if k != "rlnOpticsGroupName"}
    keyframe = pd.DataFrame({**keys, **extra_optics})
    codes, uniques = pd.factorize(keyframe.astype(str).agg("|".join, axis=1), sort=False)
    _, first = np.unique(codes, return_index=True)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(len(first))],
            "rlnOpticsGroup": np.arange(1, len(first) + 1),
        }
    )
    for k, v in {**keys, **extra_optics}.items():
        optics[k] = np.asarray(v)[first]
    optics["rlnImageSize"] = box
    optics["rlnImageDimensionality"] = 2

    cols: dict[str, np.ndarray] = {
        "rlnImageName": np.asarray(image_names, dtype=object),
        "rlnOpticsGroup": codes + 1,
    }
    if has_ctf:
        cols.update(
            rlnDefocusU=ctf.defocus_u_a,
            rlnDefocusV=ctf.defocus_v_a,
            rlnDefocusAngle=ctf.defocus_angle_deg,
            rlnPhaseShift=ctf.phase_shift_deg,
            rlnCtfBfactor=ctf.bfactor,
            rlnCtfScalefactor=ctf.scale,
        )
    oriented = meta.has_orientation
    if oriented.any():
        if not oriented.all():
            raise CryorefineError(
                "some particles have orientations and others not; a STAR file cannot say so"
            )
        rot, tilt, psi = matrices_to_relion(meta.rotations)
        cols.update(
            rlnAngleRot=rot,
            rlnAngleTilt=tilt,
            rlnAnglePsi=psi,
            rlnOriginXAngst=-meta.shift_a[:, 0],
            rlnOriginYAngst=-meta.shift_a[:, 1],
        )
    elif np.any(meta.shift_a != 0):
        cols.update(rlnOriginXAngst=-meta.shift_a[:, 0], rlnOriginYAngst=-meta.shift_a[:, 1])
    if np.any(meta.class_number >= 0):
        cols["rlnClassNumber"] = meta.class_number + 1
    if np.any(meta.half_set > 0):
        cols["rlnRandomSubset"] = meta.half_set
    for k, v in meta.extra.items():
        cols.setdefault(k, v)
    particles = pd.DataFrame(cols)
    body = starfile.to_string(
        {"optics": optics, "particles": particles}, float_format="%.6f", sep=" "
    )
    lines = [ln for ln in body.splitlines() if not ln.startswith("# Created by")]
    out = []
    for ln in lines:
        if ln.startswith("data_"):
            out += ["# version 30001", ""]
        out.append(ln)
    return "\n".join(out).strip("\n") + "\n\n"


def write_particle_star(
    path: str | os.PathLike,
    meta: ParticleMetadata,
    image_names: list[str] | np.ndarray,
    box: int,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a RELION 3.1 particle STAR file atomically."""
    text = particles_star_text(meta, image_names, box)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_orientations_star(path: str | os.PathLike) -> np.ndarray:
    """Only the orientations ``(k, 3, 3)`` of a STAR file's particle table.

    Needs ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` (missing ones count as 0,
    all three missing is an error); image files are not looked at.
    """
    return read_poses_star(path, apix=0.0)[0]


def read_poses_star(path: str | os.PathLike, *, apix: float) -> tuple[np.ndarray, np.ndarray]:
    """Only the poses of a STAR file's particle table: orientations ``(k, 3, 3)`` (as
    :func:`read_orientations_star`) and shifts ``(k, 2)`` in Å (``-rlnOriginXAngst``,
    ``-rlnOriginYAngst``, or the pixel origins times ``apix``; 0 where absent); image
    files are not looked at."""
    path = Path(path)
    blocks = read_star_blocks(path)
    cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    table = next(
        (
            b
            for name in ("particles", "images", "")
            if (b := blocks.get(name)) is not None and any(c in b.columns for c in cols)
        ),
        None,
    )
    if table is None:
        table = next((b for b in blocks.values() if any(c in b.columns for c in cols)), None)
    if table is None:
        raise CryorefineError(f"{path}: no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns")
    rotations = relion_to_matrices(*(_column(table, c, 0.0, path) for c in cols))
    if "rlnOriginXAngst" in table.columns or "rlnOriginYAngst" in table.columns:
        origin = [_column(table, f"rlnOrigin{a}Angst", 0.0, path) for a in "XY"]
    else:
        origin = [_column(table, f"rlnOrigin{a}", 0.0, path) * apix for a in "XY"]
    return rotations, -np.stack(origin, axis=1)
