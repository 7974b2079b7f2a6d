"""Orientation generators (``--orientgen``): ``eman``, ``even``, ``saff``, ``rand``.

Each covers the asymmetric unit of a symmetry group (:mod:`geometry.symmetry`) and
returns ``(k, 3, 3)`` rotation matrices in a deterministic order (the index is the
projection and later the class number). Built on EMAN2's ``OrientationGenerator``s;
``eman`` reproduces EMAN2's float32 ring walk exactly, so its counts match EMAN2's.
Shared parameters: ``random_phi`` (phi uniform in [0, 360) instead of 0) and
``phitoo`` (also emit phi + k * phitoo).
"""

from __future__ import annotations

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import eman_to_matrices
from cryorefine.geometry.symmetry import SymmetryGroup, symmetry_group
from cryorefine.registry import ORIENTGENS, Modifier, Param

F32 = np.float32


def _emit(
    az: list[float], alt: list[float], *, random_phi: bool, phitoo: float, rng: np.random.Generator
) -> np.ndarray:
    az_a, alt_a = np.asarray(az, dtype=np.float64), np.asarray(alt, dtype=np.float64)
    phi = rng.uniform(0, 360, len(az_a)) if random_phi else np.zeros(len(az_a))
    if phitoo > 0:
        steps = np.arange(0.0, 360.0 - phitoo + 1e-9, phitoo)
        az_a = np.repeat(az_a, len(steps))
        alt_a = np.repeat(alt_a, len(steps))
        phi = np.mod(np.repeat(phi, len(steps)) + np.tile(steps, len(phi)), 360.0)
    if len(az_a) == 0:
        return np.zeros((0, 3, 3))
    return eman_to_matrices(az_a, alt_a, phi)


def _inside(sym: SymmetryGroup, alt: float, az: float, inc_mirror: bool) -> bool:
    return bool(sym.in_asym_unit(np.float64(alt), np.float64(az), inc_mirror=inc_mirror))


def eman_directions(
    sym: SymmetryGroup,
    delta: float,
    *,
    inc_mirror: bool = False,
    perturb: bool = False,
    alt_min: float = 0.0,
    alt_max: float = 180.0,
    rng: np.random.Generator | None = None,
) -> tuple[list[float], list[float]]:
    """EMAN2's ``eman`` ring walk: the ``(az, alt)`` list in degrees (offset applied)."""
    rng = rng or np.random.default_rng()
    delta32 = F32(delta)
    zm = F32(sym.az_max(inc_mirror))
    am = F32(min(sym.alt_max(inc_mirror), alt_max))
    n = sym.n
    azs: list[float] = []
    alts: list[float] = []
    alt = F32(0.0)
    while alt <= am:
        if alt == 0:
            h = zm
        else:
            h = F32(delta32 / F32(np.sin(F32(alt) * F32(np.pi / 180.0))))
            if zm / h < F32(2.8) or h < 0:
                h = F32(zm / F32(2.1))
        zend, oddflag = zm, False
        if sym.kind == "d" and alt == am and n % 2 == 1:
            zend, oddflag = (F32(zm / 4), True) if inc_mirror else (F32(zm / 2), False)
        elif sym.kind == "d" and alt == am and n % 2 == 0 and inc_mirror:
            zend = F32(zm / 2)
        elif sym.kind == "c" and not inc_mirror and alt == am and n % 2 == 1:
            zend = F32(zm / 2)
        elif sym.kind in ("c", "tet"):
            zend = F32(zm - h / F32(4))
        elif inc_mirror and sym.kind in ("d", "oct", "icos"):
            zend = F32(zm - h / F32(4))
        if alt < alt_min:
            alt = F32(alt + delta32)
            continue
        az = F32(0.0)
        while az <= zend:
            if alt == 0 and az > 0:
                az = F32(az + h)
                continue
            if sym.platonic and not _inside(sym, alt, az, inc_mirror):
                az = F32(az + h)
                continue
            az_out, alt_out = float(az) + sym.az_offset, float(alt)
            if perturb and alt != 0:
                alt_out += rng.normal(0, float(delta32) / 8)
                az_out += rng.normal(0, float(h) / 8)
            azs.append(az_out)
            alts.append(alt_out)
            az = F32(az + h)
            if az > zend and oddflag:
                zend, oddflag = zm, False
                az = F32(az + zm / F32(2))
        alt = F32(alt + delta32)
    return azs, alts


def even_directions(
    sym: SymmetryGroup, delta: float, *, inc_mirror: bool = False
) -> tuple[list[float], list[float]]:
    """Penczek's (1994) even rings: ``(az, alt)`` in degrees (offset applied)."""
    zm = sym.az_max(inc_mirror)
    am = sym.alt_max(inc_mirror)
    azs, alts = [], []
    alt = F32(0.0)
    while alt <= am:
        if alt == 0 or alt == 180:
            ring = [0.0]
        else:  # float32 as in EMAN2: int() truncation depends on it
            sin_alt = F32(np.sin(F32(alt) * F32(np.pi / 180.0)))
            lt = max(int(F32(zm) / F32(F32(delta) / sin_alt)) - 1, 1)
            ring = [float(F32(i) * F32(zm) / F32(lt)) for i in range(lt)]
        for az in ring:
            if sym.platonic and not _inside(sym, float(alt), az, inc_mirror):
                continue
            azs.append(az + sym.az_offset)
            alts.append(float(alt))
        alt = F32(alt + F32(delta))
    return azs, alts


def saff_directions(
    sym: SymmetryGroup, delta: float, *, inc_mirror: bool = False
) -> tuple[list[float], list[float]]:
    """Saff & Kuijlaars spiral: ``(az, alt)`` in degrees (offset applied)."""
    zm = sym.az_max(inc_mirror)
    am = sym.alt_max(inc_mirror)
    s = np.deg2rad(delta)
    dz = np.cos(np.deg2rad(am)) - 1.0
    npts = int((3.6 / s) ** 2 * abs(dz) * zm / 720.0)
    azs, alts = [0.0 + sym.az_offset], [0.0]
    az = 0.0
    for i in range(1, npts):
        z = 1.0 + dz * i / (npts - 1)
        r = np.sqrt(max(1.0 - z * z, 0.0))
        # at the closing pole r = 0: EMAN2 emits az = NaN; the pole is az 0 here
        az = 0.0 if r == 0 else np.fmod(az + delta / r, zm)
        alt = float(np.rad2deg(np.arccos(z)))
        if sym.platonic and not _inside(sym, alt, az, inc_mirror):
            continue
        azs.append(az + sym.az_offset)
        alts.append(alt)
    return azs, alts


def _delta_for_count(count_fn, n: int) -> float:
    """Bisect delta in (0, 180] so that ``count_fn(delta)`` is ``n`` (EMAN2's approach)."""
    lo, hi = 0.0, 180.0
    delta = 180.0
    while hi - lo > 1e-4:
        got = count_fn(delta)
        if got == n:
            return delta
        if got < n:
            hi = delta
        else:
            lo = delta
        delta = (lo + hi) / 2
    return delta


def _common_params(extra: tuple[Param, ...]) -> tuple[Param, ...]:
    return extra + (
        Param("random_phi", bool, "draw phi uniformly in [0, 360) instead of 0", default=False),
        Param(
            "phitoo", float, "also emit phi + k * phitoo (degrees) for each direction", default=0.0
        ),
    )


_DELTA_N = (
    Param("delta", float, "angular step in degrees"),
    Param("n", int, "approximate number of orientations instead of delta"),
    Param("inc_mirror", bool, "include the mirror half of the asymmetric unit", default=False),
)


def _check_delta_n(params: dict, where: str) -> None:
    given = [k for k in ("delta", "n") if params.get(k) is not None]
    if len(given) != 1:
        raise CryorefineError(f"{where}: give exactly one of delta, n")
    if params[given[0]] <= 0:
        raise CryorefineError(f"{where}: {given[0]} must be positive")
    if params.get("delta") is not None and params["delta"] > 180:
        raise CryorefineError(f"{where}: delta must be at most 180 degrees")
    if params.get("phitoo", 0) < 0:
        raise CryorefineError(f"{where}: phitoo must not be negative")


def _eman_delta(
    sym: SymmetryGroup, delta: float | None, n: int | None, mirror: bool, alt_min, alt_max
) -> float:
    """The ``eman`` ring walk's step: ``delta``, or the one giving ``n`` directions."""
    if delta is not None:
        return float(delta)
    return _delta_for_count(
        lambda d: len(
            eman_directions(sym, d, inc_mirror=mirror, alt_min=alt_min, alt_max=alt_max)[0]
        ),
        n,
    )


def _ring_delta(directions, sym: SymmetryGroup, delta, n, inc_mirror: bool) -> float:
    """A ring generator's step: ``delta``, or the one giving ``n`` directions."""
    if delta is not None:
        return float(delta)
    return _delta_for_count(lambda d: len(directions(sym, d, inc_mirror=inc_mirror)[0]), n)


@ORIENTGENS.register(
    "eman",
    "EMAN2's rings of constant alt with azimuth step delta/sin(alt) (e2refine's default).",
    _common_params(
        _DELTA_N
        + (
            Param(
                "perturb",
                bool,
                "jitter each direction by N(0, delta/8) in alt, N(0, h/8) in az",
                default=True,
            ),
            Param("alt_min", float, "lowest alt (degrees)", default=0.0),
            Param("alt_max", float, "highest alt (degrees)", default=180.0),
            Param("breaksym", bool, "cover all symmetry copies (reconstruct in c1)", default=False),
        )
    ),
    check=_check_delta_n,
)
def eman(
    sym: SymmetryGroup,
    *,
    rng: np.random.Generator,
    delta=None,
    n=None,
    inc_mirror=False,
    perturb=True,
    alt_min=0.0,
    alt_max=180.0,
    breaksym=False,
    random_phi=False,
    phitoo=0.0,
) -> np.ndarray:
    mirror = inc_mirror or breaksym
    delta = _eman_delta(sym, delta, n, mirror, alt_min, alt_max)
    azs, alts = eman_directions(
        sym, delta, inc_mirror=mirror, perturb=perturb, alt_min=alt_min, alt_max=alt_max, rng=rng
    )
    rots = _emit(azs, alts, random_phi=random_phi, phitoo=phitoo, rng=rng)
    if breaksym and sym.order > 1:
        rots = np.concatenate([rots] + [rots @ op for op in sym.operators[1:]])
        if not inc_mirror:
            rots = rots[rots[:, 2, 2] >= 0]
    return rots


def _ring_generator(directions):
    """An orientation generator from a ``directions(sym, delta, inc_mirror=)`` function."""

    def generate(
        sym: SymmetryGroup,
        *,
        rng: np.random.Generator,
        delta=None,
        n=None,
        inc_mirror=False,
        random_phi=False,
        phitoo=0.0,
    ) -> np.ndarray:
        delta = _ring_delta(directions, sym, delta, n, inc_mirror)
        azs, alts = directions(sym, delta, inc_mirror=inc_mirror)
        return _emit(azs, alts, random_phi=random_phi, phitoo=phitoo, rng=rng)

    return generate


even = ORIENTGENS.register(
    "even",
    "Penczek's even rings: alt steps of delta, equal azimuth steps on each ring.",
    _common_params(_DELTA_N),
    check=_check_delta_n,
)(_ring_generator(even_directions))

saff = ORIENTGENS.register(
    "saff",
    "Saff & Kuijlaars spiral of nearly equally spaced directions.",
    _common_params(_DELTA_N),
    check=_check_delta_n,
)(_ring_generator(saff_directions))


_RING_DIRECTIONS = {"even": even_directions, "saff": saff_directions}


def _check_rand(params: dict, where: str) -> None:
    if params["n"] is None or params["n"] <= 0:
        raise CryorefineError(f"{where}: n must be a positive number of orientations")


@ORIENTGENS.register(
    "rand",
    "n random directions, uniform on the sphere, reduced into the asymmetric unit.",
    (
        Param("n", int, "number of orientations", required=True),
        Param("inc_mirror", bool, "no effect (kept for EMAN2 compatibility)", default=False),
        Param("phitoo", bool, "random phi as well", default=False),
        Param("seed", int, "random seed (default: the caller's generator)"),
    ),
    check=_check_rand,
)
def rand(
    sym: SymmetryGroup,
    *,
    rng: np.random.Generator,
    n: int,
    inc_mirror=False,
    phitoo=False,
    seed=None,
) -> np.ndarray:
    rng = np.random.default_rng(seed) if seed is not None else rng
    pts = []
    while sum(len(p) for p in pts) < n:  # Marsaglia (1972): uniform on the sphere
        u = rng.uniform(-1, 1, (2 * n, 2))
        s = (u * u).sum(axis=1)
        u, s = u[s <= 1], s[s <= 1]
        pts.append(np.c_[2 * u[:, 0] * np.sqrt(1 - s), 2 * u[:, 1] * np.sqrt(1 - s), 2 * s - 1])
    xyz = np.concatenate(pts)[:n]
    alt = np.rad2deg(np.arccos(np.clip(xyz[:, 2], -1, 1)))
    az = np.rad2deg(np.arctan2(xyz[:, 1], xyz[:, 0]))
    rots = _emit(list(az), list(alt), random_phi=phitoo, phitoo=0.0, rng=rng)
    if sym.order > 1:
        rots = sym.reduce(rots, inc_mirror=True)[0]
    return rots


def orientations(
    orientgen: str | Modifier,
    sym: str | SymmetryGroup,
    *,
    rng: np.random.Generator | None = None,
    option: str = "--orientgen",
) -> np.ndarray:
    """Orientations ``(k, 3, 3)`` for an ``--orientgen`` string and a symmetry."""
    mod = ORIENTGENS.parse(orientgen, option=option) if isinstance(orientgen, str) else orientgen
    if mod is None:
        raise CryorefineError(f"{option}: an orientation generator is required")
    group = symmetry_group(sym) if isinstance(sym, str) else sym
    return mod(group, rng=rng or np.random.default_rng())


def angular_step_deg(orientgen: Modifier, sym: str | SymmetryGroup) -> float:
    """The angular step (degrees) of the orientations ``orientgen`` generates over the
    asymmetric unit of ``sym``: its ``delta``, or for ``n=`` the step that gives ``n``
    directions (the one the generator uses). ``rand``: the spacing of ``n`` directions
    spread evenly over the asymmetric unit with its mirror, ``sqrt(4 pi / (order n))``."""
    group = symmetry_group(sym) if isinstance(sym, str) else sym
    p = orientgen.params
    if orientgen.name == "eman":
        mirror = bool(p["inc_mirror"] or p["breaksym"])
        return _eman_delta(group, p["delta"], p["n"], mirror, p["alt_min"], p["alt_max"])
    if orientgen.name in _RING_DIRECTIONS:
        return _ring_delta(
            _RING_DIRECTIONS[orientgen.name], group, p["delta"], p["n"], bool(p["inc_mirror"])
        )
    if p.get("delta") is not None:
        return float(p["delta"])
    if p.get("n"):
        return float(np.rad2deg(np.sqrt(4 * np.pi / (group.order * p["n"]))))
    raise CryorefineError(f"--orientgen {orientgen}: no angular step (give delta or n)")
