"""Run configurations: frozen dataclasses whose fields mirror the command-line options.

One config per stage (:class:`Project3dConfig`, :class:`SimmxConfig`,
:class:`ClassifyConfig`, :class:`ClassaverageConfig`, :class:`Make3dConfig`) and
:class:`RefineConfig`, which composes them. Each validates itself in
``__post_init__``: every option string is parsed there, once, and files named inside
option strings (masks, structure factors) are read there, once; the parsed objects are
kept on the config (fields ending in ``_mod``/``_mods``, not compared or printed). The
library therefore refuses exactly what the command line refuses, before any data is
read, and no stage parses a string or opens an option's file per chunk.

This module also imports every module that registers EMAN2 objects, so that code
above it sees complete registries.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# modules that fill the registries when imported (config sits above all of them)
from cryorefine import processors  # noqa: F401
from cryorefine.align import align2d, average, compare  # noqa: F401
from cryorefine.errors import CryorefineError, OptionError
from cryorefine.fourier import project, reconstruct  # noqa: F401
from cryorefine.geometry import orientations  # noqa: F401
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.modifiers import read_image, read_modifier_files
from cryorefine.registry import (
    ALIGNERS,
    AVERAGERS,
    COMPARATORS,
    ORIENTGENS,
    PROCESSORS,
    PROJECTORS,
    RECONSTRUCTORS,
    Modifier,
    Registry,
)


def parse_option(registry: Registry, text: str | None, *, option: str) -> Modifier | None:
    """Parse one modifier option and read the files it names; ``None`` for none/empty."""
    return read_modifier_files(registry.parse(text, option=option), option=option)


def _required(registry: Registry, text: str | None, *, option: str) -> Modifier:
    """:func:`parse_option` for an option that cannot be ``none``."""
    mod = parse_option(registry, text, option=option)
    if mod is None:
        article = "an" if registry.singular[0] in "aeiou" else "a"
        raise CryorefineError(f"{option}: {article} {registry.singular} is required")
    return mod


def automask_processor(values: str, *, option: str = "--automask3d") -> str:
    """EMAN2's ``--automask3d thr,radius,nshells,nshellsgauss,nmaxseed`` as a processor."""
    parts = [v.strip() for v in values.split(",")]
    if len(parts) != 5 or not all(parts):
        raise CryorefineError(
            f"{option} '{values}': give threshold,radius,nshells,nshellsgauss,nmaxseed "
            "(e.g. 1.1,30,5,5,0)"
        )
    keys = ("threshold", "radius", "nshells", "nshellsgauss", "nmaxseed")
    return "mask.auto3d:" + ":".join(f"{k}={v}" for k, v in zip(keys, parts, strict=True))


def _parsed() -> Any:
    """A field filled in ``__post_init__`` with parsed options (not compared or shown)."""
    return field(init=False, repr=False, compare=False, default=None)


def _set(cfg: Any, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)


def _weights_by_snr(*comparators: Modifier | None) -> bool:
    """Whether any of the comparators weights rings by the particles' SNR."""
    return any(m is not None and m.params.get("snrweight") for m in comparators)


def _processors(texts: tuple[str, ...], option: str) -> tuple[Modifier, ...]:
    mods = (parse_option(PROCESSORS, t, option=option) for t in texts)
    return tuple(m for m in mods if m is not None)


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    registry: Registry | None = None,
    eman2: bool = True,
) -> Any:
    """A config field that is an option of its stage's command.

    ``help``: what it does, naming other options of the stage as ``{field}`` (each
    command spells them its own way); ``flag``: the command's spelling (default
    ``--field``; a ``bool`` field that defaults to true is switched off by its flag,
    ``--no-...``); ``registry``: the help lists its registered names; ``eman2``: the
    EMAN2 program of the stage takes the option under the same name (so run.log's
    EMAN2 line carries it).
    """
    meta = {"flag": flag, "help": help, "metavar": metavar, "registry": registry, "eman2": eman2}
    return field(default=default, metadata=meta)


def is_option(f: Any) -> bool:
    """Whether dataclass field ``f`` is a stage option (made by :func:`option`)."""
    return "help" in f.metadata


def option_help(f: Any, spelling: Mapping[str, str]) -> str:
    """The help of option field ``f``, its stage's options spelled by ``spelling``
    (field -> flag), with the names its registry holds."""
    text = f.metadata["help"].format(**spelling)
    registry = f.metadata["registry"]
    return f"{text}: {registry.help_list()}" if registry is not None else text


def option_type(cls: type, f: Any) -> type:
    """What option field ``f`` of config class ``cls`` holds: ``bool``, ``int``,
    ``float``, ``str`` or ``tuple`` (of strings), ``None`` aside."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    return typing.get_origin(hint) or hint


class StageOptions:
    """What the stage configs share: their errors name options as the command that was
    run spells them (:class:`~cryorefine.errors.OptionError`).

    ``STAGE`` names the stage; each option is a field made by :func:`option`, which
    says how the stage's command spells it, its help, and its EMAN2 name.
    """

    STAGE: ClassVar[str]

    @classmethod
    def options(cls) -> tuple[Any, ...]:
        """The fields that are options of the stage's command (:func:`option`)."""
        return tuple(f for f in fields(cls) if is_option(f))

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Each option field spelled as the stage's own command (``cryorefine STAGE``)
        spells it."""
        return {f.name: f.metadata["flag"] or f"--{f.name}" for f in cls.options()}

    def eman2_args(self) -> str:
        """The options set, as the stage's EMAN2 program takes them: ``--name=value``
        for each value, a true ``bool`` as its flag, a list as one ``--name=`` per entry
        (options that EMAN2 lacks left out)."""
        flags, out = self.flags(), []
        for f in self.options():
            value = getattr(self, f.name)
            if not f.metadata["eman2"] or value is None or value is False or value == ():
                continue
            if value is True:
                out.append(flags[f.name])
            else:
                values = value if isinstance(value, tuple) else (value,)
                out += [f"{flags[f.name]}={v}" for v in values]
        return " ".join(out)

    def error(self, template: str, *values: object) -> OptionError:
        """An error naming options ``{field}`` of this stage (values ``{0}``, ``{1}``...)."""
        return OptionError(self.STAGE, self.flags(), template, *values)

    @contextmanager
    def naming(self, name: str) -> Iterator[str]:
        """A block that handles field ``name``: yields its option; an error that names
        that option (from a parser or a file reader, which know only the option they were
        given) is re-raised naming the field, so that each command spells it its own way."""
        flag = self.flags()[name]
        try:
            yield flag
        except OptionError:
            raise
        except CryorefineError as err:
            text = str(err)
            rest = text[len(flag) :] if text.startswith(flag) else f": {text}"
            raise self.error("{" + name + "}{0}", rest) from None

    def _modifier(self, registry: Registry, name: str, *, required: bool = False):
        """Field ``name`` (a modifier string) parsed with ``registry``."""
        with self.naming(name) as flag:
            parse = _required if required else parse_option
            return parse(registry, getattr(self, name), option=flag)

    def _processor_list(self, name: str) -> tuple[Modifier, ...]:
        """Field ``name`` (processor strings) parsed; ``none`` entries dropped."""
        with self.naming(name) as flag:
            return _processors(getattr(self, name), flag)


@dataclass(frozen=True)
class Project3dConfig(StageOptions):
    """Options of ``project3d`` (EMAN2 e2project3d).

    ``orientgen``: orientation generator over the asymmetric unit of ``sym``;
    ``projector``: ``fourier`` or ``standard``; ``postprocess``: processors applied to
    each projection; ``seed``: for ``perturb``/random generators.
    """

    orientgen: str = option(
        "eman:delta=5.0:inc_mirror=0:perturb=1",
        "orientation generator over the asymmetric unit",
        registry=ORIENTGENS,
    )
    sym: str = option("c1", "symmetry: cN, dN, tet, oct, icos")
    projector: str = option(
        "fourier", "projector (standard: EMAN2's real-space one)", registry=PROJECTORS
    )
    postprocess: tuple[str, ...] = option(
        (), "processor applied to each projection (repeatable)", metavar="NAME:K=V"
    )
    seed: int | None = option(None, "random seed for perturb/random generators", eman2=False)

    orientgen_mod: Modifier = _parsed()
    projector_mod: Modifier = _parsed()
    postprocess_mods: tuple[Modifier, ...] = _parsed()

    STAGE: ClassVar[str] = "project3d"

    def __post_init__(self) -> None:
        with self.naming("sym"):
            symmetry_group(self.sym)
        _set(self, "orientgen_mod", self._modifier(ORIENTGENS, "orientgen", required=True))
        _set(self, "projector_mod", self._modifier(PROJECTORS, "projector", required=True))
        _set(self, "postprocess_mods", self._processor_list("postprocess"))


@dataclass(frozen=True)
class SimmxConfig(StageOptions):
    """Options of ``simmx`` (EMAN2 e2simmx / e2simmx2stage), as EMAN2 modifier strings.

    ``mask``: a 2D image file multiplied into both images before the final score
    (read once, here); ``shrink``: block-average both stacks by this factor first
    (``None`` or 0: off; at least 2); ``twostage``: the stage-1 shrink factor of
    e2simmx2stage (0: one stage); ``chunk``: particles per chunk (``None``: as many as
    about :data:`CHUNK_BYTES` of working memory holds).
    """

    align: str | None = option(
        "rotate_translate_flip", "aligner (none: no alignment)", registry=ALIGNERS
    )
    aligncmp: str = option("dot", "comparator inside {align}", registry=COMPARATORS)
    ralign: str | None = option(None, "refining aligner run after {align}", registry=ALIGNERS)
    raligncmp: str = option("dot", "comparator of {ralign}")
    cmp: str = option("dot:normalize=1", "comparator giving the score", registry=COMPARATORS)
    mask: str | None = option(
        None, "2D mask image multiplied into both images before the score", metavar="FILE"
    )
    shrink: int | None = option(None, "block-average both stacks by this factor first (>= 2)")
    prefilt: bool = option(
        False,
        "filter each projection to the particle's power spectrum before aligning (one "
        "filter per pair: runs pair by pair, much slower than the batched engine)",
    )
    twostage: int = option(
        0,
        "coarse search over averaged projections shrunk by this factor, then a local full "
        "search (e2simmx2stage); 0: off",
        eman2=False,
    )
    chunk: int | None = option(
        None,
        "particles per batch (default: as many as about 1 GiB of working memory holds)",
        eman2=False,
    )

    align_mod: Modifier | None = _parsed()
    aligncmp_mod: Modifier | None = _parsed()
    ralign_mod: Modifier | None = _parsed()
    raligncmp_mod: Modifier | None = _parsed()
    cmp_mod: Modifier = _parsed()
    mask_image: np.ndarray | None = _parsed()

    STAGE: ClassVar[str] = "simmx"

    def __post_init__(self) -> None:
        if self.shrink == 0:
            _set(self, "shrink", None)
        if self.shrink is not None and self.shrink < 2:
            raise self.error("{shrink} {0}: must be at least 2 (or 0: off)", self.shrink)
        if self.twostage < 0:
            raise self.error("{twostage} {0}: must be 0 (off) or a shrink factor", self.twostage)
        if self.chunk is not None and self.chunk < 1:
            raise self.error("{chunk} {0}: at least one particle per chunk", self.chunk)
        _set(self, "align_mod", self._modifier(ALIGNERS, "align"))
        _set(self, "aligncmp_mod", self._modifier(COMPARATORS, "aligncmp"))
        _set(self, "ralign_mod", self._modifier(ALIGNERS, "ralign"))
        _set(self, "raligncmp_mod", self._modifier(COMPARATORS, "raligncmp"))
        _set(self, "cmp_mod", self._modifier(COMPARATORS, "cmp", required=True))
        if self.mask is not None:
            with self.naming("mask"):
                _set(self, "mask_image", read_image(self.mask))

    def coarse(self) -> SimmxConfig:
        """This configuration for stage 2 of e2simmx2stage (the particles against the
        averaged projections): one stage, no shrink (the caller shrinks), no refining
        aligner. The parsed options are shared, not parsed again."""
        out = copy.copy(self)
        for name, value in (("twostage", 0), ("shrink", None), ("ralign", None)):
            _set(out, name, value)
        _set(out, "ralign_mod", None)
        return out

    @property
    def needs_snr(self) -> bool:
        """Whether a comparator weights rings by the particles' SNR (``snrweight``)."""
        return _weights_by_snr(self.cmp_mod, self.aligncmp_mod, self.raligncmp_mod)


@dataclass(frozen=True)
class ClassifyConfig(StageOptions):
    """Options of ``classify`` (EMAN2 e2classify): ``sep`` classes per particle;
    ``simvec``: classify by the pattern of similarities."""

    sep: int = option(1, "classes per particle")
    simvec: bool = option(False, "classify by the pattern of similarities")

    STAGE: ClassVar[str] = "classify"

    def __post_init__(self) -> None:
        if self.sep < 1:
            raise self.error("{sep} {0}: must be at least 1", self.sep)


@dataclass(frozen=True)
class ClassaverageConfig(StageOptions):
    """Options of ``classaverage`` (EMAN2 e2classaverage), with the defaults e2refine
    passes to it (``--classiter``, ``--classkeep``, ``--classalign`` ...).

    ``iterations``: align-average passes; ``keep`` (fraction, or a sigma multiple with
    ``keepsig``): members kept; ``align``/``aligncmp``/``ralign``/``raligncmp``: the
    aligners that bring members onto the average; ``cmp``: the score used to reject;
    ``averager``; ``normproc``: processor applied to each member first; ``setsfref``:
    impose the reference's structure factor; ``automask``; ``prefilt``: filter the
    average to each member's power spectrum (``filter.matchto``) before aligning the
    member to it (rounds 1.. ``iterations``, as e2classaverage).
    """

    iterations: int = option(1, "alignment rounds", flag="--iter")
    keep: float = option(0.8, "fraction of each class kept, or sigmas with {keepsig}")
    keepsig: bool = option(False, "{keep} counts standard deviations")
    align: str | None = option(
        "rotate_translate_flip", "aligner bringing members onto the average", registry=ALIGNERS
    )
    aligncmp: str = option("ccc", "comparator of {align}", registry=COMPARATORS)
    ralign: str | None = option(None, "refining aligner run after {align}", registry=ALIGNERS)
    raligncmp: str = option("ccc", "comparator of {ralign}")
    cmp: str = option("frc:snrweight=1", "comparator rating members")
    averager: str = option("mean", "averager", registry=AVERAGERS)
    normproc: str | None = option(
        "normalize.edgemean",
        "normalisation of members (none: off): a processor, see cryorefine help processors",
    )
    setsfref: bool = option(False, "give each average its projection's spectrum")
    automask: bool = option(False, "2D automask of the running average")
    prefilt: bool = option(
        False, "filter the average to each member's power spectrum before aligning it"
    )

    align_mod: Modifier | None = _parsed()
    aligncmp_mod: Modifier | None = _parsed()
    ralign_mod: Modifier | None = _parsed()
    raligncmp_mod: Modifier | None = _parsed()
    cmp_mod: Modifier = _parsed()
    averager_mod: Modifier = _parsed()
    normproc_mod: Modifier | None = _parsed()

    STAGE: ClassVar[str] = "classaverage"

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise self.error("{iterations} {0}: must be at least 0", self.iterations)
        if not self.keepsig and not 0 < self.keep <= 1:
            raise self.error(
                "{keep} {0}: a fraction must be in (0, 1] (or use {keepsig})", self.keep
            )
        _set(self, "align_mod", self._modifier(ALIGNERS, "align"))
        if self.iterations > 0 and self.align_mod is None:  # None, "" or "none"
            raise self.error("{iterations} {0}: re-alignment rounds need {align}", self.iterations)
        _set(self, "aligncmp_mod", self._modifier(COMPARATORS, "aligncmp"))
        _set(self, "ralign_mod", self._modifier(ALIGNERS, "ralign"))
        _set(self, "raligncmp_mod", self._modifier(COMPARATORS, "raligncmp"))
        _set(self, "cmp_mod", self._modifier(COMPARATORS, "cmp", required=True))
        _set(self, "averager_mod", self._modifier(AVERAGERS, "averager", required=True))
        _set(self, "normproc_mod", self._modifier(PROCESSORS, "normproc"))

    @property
    def needs_snr(self) -> bool:
        """Whether a comparator weights rings by the particles' SNR (``snrweight``)."""
        return _weights_by_snr(self.cmp_mod, self.aligncmp_mod, self.raligncmp_mod)


@dataclass(frozen=True)
class Make3dConfig(StageOptions):
    """Options of ``make3d`` (EMAN2 e2make3d).

    ``pad_px``: padded image size in pixels (default twice the box); ``iterations``,
    ``keep``, ``keepsig``, ``keepabs``: EMAN2's slice rating and exclusion passes;
    ``use_ctf``/``use_weights``: use the metadata's CTF and weights; ``mask_sphere``:
    damp the corners outside the inscribed sphere; ``wiener``: weight each shell of the
    map by the spectral SNR (from the FSC of the two half sets when the particles carry
    them, else of alternate particles; see ``fourier.reconstruct.wiener_gain``);
    ``automask3d``: EMAN2's five comma-separated ``mask.auto3d`` values, applied last;
    ``setsf``: impose a structure factor (file read here, once); ``oversample_2d``: pad
    each image as the volume before its 2D transform (accurate; off: insert the unpadded
    transform at scaled positions, 4x less work, as RELION).
    """

    sym: str = option("c1", "symmetry: cN, dN, tet, oct, icos")
    pad_px: int | None = option(
        None, "pad images to this size in px (default: twice the box)", flag="--pad"
    )
    recon: str = option(
        "fourier", "reconstructor (fourier:mode=gauss_2 as EMAN2)", registry=RECONSTRUCTORS
    )
    preprocess: tuple[str, ...] = option(
        (), "processor applied to each image first (repeatable)", metavar="NAME:K=V"
    )
    postprocess: tuple[str, ...] = option(
        (), "processor applied to the map (repeatable)", metavar="NAME:K=V"
    )
    setsf: str | None = option(
        None, "impose this structure factor (text file or map)", metavar="FILE"
    )
    automask3d: str | None = option(
        None,
        "mask the map with mask.auto3d (EMAN2's five values, e.g. 1.1,30,5,5,0)",
        metavar="THR,RADIUS,NSHELLS,NSHELLSGAUSS,NMAXSEED",
        eman2=False,
    )
    use_ctf: bool = option(True, "ignore the CTF in the metadata", flag="--no-ctf", eman2=False)
    use_weights: bool = option(
        True,
        "weight every image 1 (default: the metadata's weights)",
        flag="--no-wt",
        eman2=False,
    )
    mask_sphere: bool = option(
        True, "keep the noise outside the inscribed sphere", flag="--no-sphere-mask", eman2=False
    )
    wiener: bool = option(
        True,
        "divide by the summed weights alone (e2make3d); default: a Wiener filter from the FSC "
        "of the half sets (rlnRandomSubset, else alternate particles)",
        flag="--no-wiener",
        eman2=False,
    )
    oversample_2d: bool = option(
        True,
        "insert unpadded image transforms (4x less work, as RELION; slightly less accurate "
        "at high resolution)",
        flag="--no-oversample",
        eman2=False,
    )
    iterations: int = option(
        1,
        "passes; from 2 on, slices are rated against the map and the worst left out "
        "(e2make3d's default and e2refine's --m3diter are 2)",
        flag="--iter",
    )
    keep: float = option(1.0, "fraction of slices kept (a sigma multiple with {keepsig})")
    keepsig: bool = option(False, "{keep} is a sigma multiple")
    keepabs: bool = option(False, "rate slices by absolute, not locally relative, quality")

    recon_mod: Modifier = _parsed()
    preprocess_mods: tuple[Modifier, ...] = _parsed()
    #: setsf, the post-processors and the automask, in the order they are applied
    postprocess_mods: tuple[Modifier, ...] = _parsed()

    STAGE: ClassVar[str] = "make3d"

    def __post_init__(self) -> None:
        with self.naming("sym"):
            symmetry_group(self.sym)
        _set(self, "recon_mod", self._modifier(RECONSTRUCTORS, "recon", required=True))
        if self.iterations < 1:
            raise self.error("{iterations} must be at least 1, got {0}", self.iterations)
        if not self.keepsig and not 0 < self.keep <= 1:
            raise self.error(
                "{keep} {0}: a fraction must be in (0, 1] (or use {keepsig})", self.keep
            )
        if self.pad_px is not None and self.pad_px < 1:
            raise self.error("{pad_px} must be a positive size in pixels, got {0}", self.pad_px)
        _set(self, "preprocess_mods", self._processor_list("preprocess"))
        post = list(self._processor_list("postprocess"))
        if self.setsf:
            with self.naming("setsf") as flag:
                setsf = f"filter.setstrucfac:strucfac={self.setsf}"
                post.insert(0, parse_option(PROCESSORS, setsf, option=flag))
        if self.automask3d is not None:
            with self.naming("automask3d") as flag:
                auto = automask_processor(self.automask3d, option=flag)
                post.append(parse_option(PROCESSORS, auto, option=flag))
        _set(self, "postprocess_mods", tuple(post))


def read_fsc_mask(path: str | Path) -> np.ndarray:
    """``--fscmask``: a soft mask map with values in [0, 1] (float32)."""
    from cryorefine.io.maps import read_map

    try:
        data = np.asarray(read_map(Path(path)).data, np.float32)
    except CryorefineError as exc:
        raise CryorefineError(f"--fscmask: {exc}") from None
    if data.min() < -1e-3 or data.max() > 1 + 1e-3 or data.max() <= 0:
        raise CryorefineError(
            f"--fscmask {path}: values run from {data.min():.3g} to {data.max():.3g}; "
            "a mask holds values from 0 to 1"
        )
    return np.clip(data, 0.0, 1.0)


def breaks_symmetry(orientgen: Modifier) -> bool:
    """Whether an orientation generator covers every symmetry copy (``breaksym=1``)."""
    return bool(orientgen.params.get("breaksym"))


#: what a refinement reconstructs from (``RefineConfig.m3dsource``)
M3D_SOURCES = ("particles", "classes")
#: the local search's scores (``--localrefine ...:score=``)
LOCAL_SCORES = ("ssnr", "simcmp")
#: the comparators the local search can score with (``score=simcmp``)
LOCAL_COMPARATORS = ("frc", "ccc")


@dataclass(frozen=True)
class LocalRefine:
    """``--localrefine``: when the particles' poses are refined locally.

    ``mode``: ``auto`` (global iterations until their median orientation change falls
    below the angular step, then local ones), ``global`` (``0``: e2refine's chain) or
    ``local`` (``1``: local from the first iteration, around the input's poses);
    ``range_deg``: the first local iteration's search radius (``None``: the angular step
    of ``--orientgen``); ``step_deg``: its grid spacing (``None``: half the range);
    ``shift_px``: the shift search radius; ``score``: ``ssnr`` (correlation over rings
    weighted by their expected SNR: the particle's CTF^2 times the half maps' SSNR) or
    ``simcmp`` (the comparator ``--simcmp`` names: frc or ccc).
    """

    mode: str = "auto"
    range_deg: float | None = None
    step_deg: float | None = None
    shift_px: float = 2.0
    score: str = "ssnr"

    @classmethod
    def parse(cls, text: str) -> LocalRefine:
        """``auto``, ``0`` or ``1``, each with optional ``:range=DEG:step=DEG:shift=PX:
        score=ssnr|simcmp``; ``1`` scores with ``simcmp`` unless told."""
        usage = "use auto, 0 or 1, with :range=DEG:step=DEG:shift=PX:score=ssnr|simcmp"
        head, *pairs = str(text).strip().lower().split(":")
        modes = {"auto": "auto", "0": "global", "1": "local"}
        if head not in modes:
            raise CryorefineError(f"--localrefine {text}: {usage}")
        values: dict[str, Any] = {"mode": modes[head], "score": "simcmp" if head == "1" else "ssnr"}
        for pair in pairs:
            key, _, value = pair.partition("=")
            try:
                if key in ("range", "step", "shift"):
                    number = float(value)
                    if not number > 0:
                        raise ValueError
                    values[{"range": "range_deg", "step": "step_deg"}.get(key, "shift_px")] = number
                elif key == "score" and value in LOCAL_SCORES:
                    values["score"] = value
                else:
                    raise ValueError
            except ValueError:
                raise CryorefineError(f"--localrefine {text}: '{pair}' ({usage})") from None
        if head == "0" and pairs:
            raise CryorefineError(f"--localrefine {text}: 0 (global only) takes no parameters")
        return cls(**values)


@dataclass(frozen=True)
class RefineConfig:
    """A refinement: the iteration count and symmetry, and one config per stage.

    The stage configs carry the options e2refine passes on (``--sim*`` to ``simmx``,
    ``--class*`` to ``classaverage``, ``--m3d*`` to ``make3d``); ``sym`` must agree
    with the projection and reconstruction configs. ``m3dsource``: reconstruct from
    every particle with its assigned orientation, shift and CTF (``particles``, our
    default), or from the class averages weighted by ``ptcl_repr`` (``classes``, as
    e2refine). ``goldstandard``: refine two fixed halves of the particles against their
    own maps, each started from the model low-passed to ``inires_a`` Å with its phases
    randomised beyond; ``seed``: every random choice of the run; ``mass_kda``,
    ``automask3d``: e2refine's ``--mass`` normalisation and ``--automask3d`` mask of
    the filtered map; ``postprocess2``: ``--m3dpostprocess2``; ``earlystop``: stop
    before ``iterations`` once the resolution and the orientations stop changing;
    ``fscmask``: a map file, the mask of the half-map FSC instead of the automatic one
    (read into ``fscmask_map``, values clipped to [0, 1]); ``localrefine``: when poses
    are refined locally (parsed into ``localrefine_mod``, a :class:`LocalRefine`).
    """

    iterations: int = 5
    sym: str = "c1"
    sep: int = 1
    m3dsource: str = "particles"
    project3d: Project3dConfig = field(default_factory=Project3dConfig)
    simmx: SimmxConfig = field(default_factory=SimmxConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    classaverage: ClassaverageConfig = field(default_factory=ClassaverageConfig)
    make3d: Make3dConfig = field(default_factory=Make3dConfig)
    goldstandard: bool = True
    inires_a: float = 30.0
    seed: int = 0
    mass_kda: float = 0.0
    automask3d: str | None = None
    postprocess2: str | None = None
    earlystop: bool = True
    fscmask: str | None = None
    localrefine: str = "auto"

    #: ``mask.auto3d`` of ``--automask3d`` (returning the mask), applied with ``--mass``
    automask3d_mod: Modifier | None = _parsed()
    postprocess2_mod: Modifier | None = _parsed()
    fscmask_map: np.ndarray | None = _parsed()
    localrefine_mod: LocalRefine = _parsed()

    def __post_init__(self) -> None:
        local = LocalRefine.parse(self.localrefine)
        _set(self, "localrefine_mod", local)
        cmp = self.simmx.cmp_mod
        if local.mode != "global" and local.score == "simcmp":
            data_weights = [k for k in ("ampweight", "nweight") if cmp.params.get(k)]
            if cmp.name not in LOCAL_COMPARATORS or data_weights:
                raise CryorefineError(
                    f"--localrefine {self.localrefine}: the local search scores with "
                    f"{' or '.join(LOCAL_COMPARATORS)} (frc without ampweight or nweight); "
                    f"--simcmp {self.simmx.cmp} is not one (give score=ssnr, or --localrefine 0)"
                )
        if self.fscmask is not None:
            _set(self, "fscmask_map", read_fsc_mask(self.fscmask))
        if self.iterations < 1:
            raise CryorefineError(f"--iter {self.iterations}: must be at least 1")
        if self.inires_a <= 0:
            raise CryorefineError(f"--inires {self.inires_a}: must be a resolution in Å (> 0)")
        if self.mass_kda < 0:
            raise CryorefineError(f"--mass {self.mass_kda}: must be positive (kDa)")
        auto = None
        if self.automask3d:
            text = automask_processor(self.automask3d) + ":return_mask=1"
            auto = parse_option(PROCESSORS, text, option="--automask3d")
        _set(self, "automask3d_mod", auto)
        _set(
            self,
            "postprocess2_mod",
            parse_option(PROCESSORS, self.postprocess2, option="--m3dpostprocess2"),
        )
        symmetry_group(self.sym)
        for name, cfg, want in (
            ("projection", self.project3d, self.sym),
            ("reconstruction", self.make3d, self.map_sym),
        ):
            if cfg.sym.lower() != want.lower():
                raise CryorefineError(
                    f"--sym {self.sym}: the {name} stage was configured with {cfg.sym} "
                    f"(expected {want})"
                )
        if self.m3dsource not in M3D_SOURCES:
            raise CryorefineError(
                f"--m3dsource {self.m3dsource}: use one of {', '.join(M3D_SOURCES)}"
            )
        if self.classify.sep != self.sep:
            raise CryorefineError(
                f"--sep {self.sep}: classify was configured with {self.classify.sep}"
            )

    @property
    def map_sym(self) -> str:
        """The symmetry the map is reconstructed in: ``c1`` when the orientations cover
        every symmetry copy (``--orientgen ...:breaksym=1``, as e2refine), else ``sym``."""
        return "c1" if breaks_symmetry(self.project3d.orientgen_mod) else self.sym
