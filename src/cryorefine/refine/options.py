"""e2refine's options (spec ch01 §3), under their own names and defaults, plus ours.

:data:`OPTIONS` lists every option once, with the configuration fields it sets: the
command line builds its parser from it, :func:`refine_config` turns the values into a
:class:`RefineConfig` (parsing every modifier string, so that a bad one is refused
before any work), and an option that a stage's config declares
(:func:`cryorefine.config.option`) takes its type, default and help from there, as the
stage's own command does. :func:`eman2_commands` writes the EMAN2 command line each
stage stands for, from the configurations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryorefine.config import (
    ClassaverageConfig,
    ClassifyConfig,
    Make3dConfig,
    Project3dConfig,
    RefineConfig,
    SimmxConfig,
    StageOptions,
    breaks_symmetry,
    option_help,
    option_type,
)
from cryorefine.errors import CryorefineError, OptionError
from cryorefine.refine.step import FSC_MASK_EXTEND_A, FSC_MASK_SOFT_EDGE_A
from cryorefine.registry import ORIENTGENS

#: the configuration each stage runs with, by the name an Option's target uses
STAGE_CONFIGS: dict[str, type[StageOptions]] = {
    "project3d": Project3dConfig,
    "simmx": SimmxConfig,
    "classify": ClassifyConfig,
    "classaverage": ClassaverageConfig,
    "make3d": Make3dConfig,
}
#: the ``--help`` group of each stage's options
_GROUP = {
    "project3d": "e2refine",
    "simmx": "simmx",
    "classify": "classify",
    "classaverage": "class",
    "make3d": "make3d",
}
#: the stage-1 shrink factor of ``--twostage auto`` when it turns two-stage simmx on
AUTO_TWOSTAGE = 2
#: "take the stage field's": an Option's ``type``, ``default`` or ``help`` not given
FIELD: Any = object()
#: a target field's value, from every option by name
Value = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Option:
    """One option of ``refine``, under e2refine's name.

    ``to``: the configuration fields it sets, each ``"stage.field"`` (``stage``: a key of
    :data:`STAGE_CONFIGS`, or ``refine`` for :class:`RefineConfig`'s own fields), or a
    pair ``("stage.field", value)`` when the field's value depends on other options;
    none: the driver reads it. ``type``, ``default`` and ``help`` are those of the first
    target that is a stage's option (:func:`cryorefine.config.option`) unless given
    (``bool``: a flag); ``group`` heads it in ``--help`` (default: its stage's);
    ``file``: its value names a file (compared by resolved path on resume).
    """

    name: str
    to: tuple[str | tuple[str, Value], ...] = ()
    default: Any = FIELD
    help: str | None = None
    type: Any = FIELD
    group: str | None = None
    file: bool = False

    def __post_init__(self) -> None:
        stage_field = self.stage_field
        if stage_field is not None:
            config, f = stage_field
            if self.type is FIELD:
                object.__setattr__(self, "type", option_type(config, f))
            if self.default is FIELD:
                object.__setattr__(self, "default", f.default)
        if self.group is None:
            first = self.targets[0][0].split(".")[0] if self.targets else ""
            object.__setattr__(self, "group", _GROUP.get(first, "cryorefine"))
        if FIELD in (self.type, self.default) or self.help is None and stage_field is None:
            raise TypeError(f"option {self.name}: give its type, default and help")

    @property
    def targets(self) -> tuple[tuple[str, Value | None], ...]:
        """Each ``("stage.field", value)`` set (``value`` ``None``: this option's own)."""
        return tuple((t, None) if isinstance(t, str) else t for t in self.to)

    @property
    def stage_field(self) -> tuple[type[StageOptions], Any] | None:
        """The first target that is a stage's option: its config class and field."""
        for target, _ in self.targets:
            stage, name = target.split(".")
            config = STAGE_CONFIGS.get(stage)
            found = [f for f in config.options() if f.name == name] if config else []
            if found:
                return config, found[0]
        return None


def _classes(o: dict[str, Any]) -> bool:
    return o["m3dsource"] == "classes"


def _map_sym(o: dict[str, Any]) -> str:
    """The symmetry the map is made in: c1 when --orientgen covers every copy."""
    gen = ORIENTGENS.parse(o["orientgen"], option="--orientgen")
    return "c1" if gen is not None and breaks_symmetry(gen) else o["sym"]


def _preprocess(o: dict[str, Any]) -> tuple[str, ...]:
    """--m3dpreprocess; not given: normalize.edgemean for class averages (e2refine)."""
    text = o["m3dpreprocess"]
    if text is None and _classes(o):
        text = "normalize.edgemean"
    return (text,) if _none(text) else ()


def _local_mode(o: dict[str, Any]) -> str:
    """--localrefine's mode (``auto``, ``0`` or ``1``), without its parameters."""
    return str(o["localrefine"]).split(":")[0].strip().lower()


def _twostage(o: dict[str, Any]) -> int:
    """--twostage as a number: ``auto`` resolved (its help)."""
    value = str(o["twostage"]).strip().lower()
    if value == "auto":
        return AUTO_TWOSTAGE if _local_mode(o) == "auto" and not o["shrink"] else 0
    try:
        return int(value)
    except ValueError:
        raise CryorefineError(
            f"--twostage {o['twostage']}: give a shrink factor, 0 (off) or auto"
        ) from None


def _setsf(o: dict[str, Any]) -> str | None:
    return o["m3dsffile"] or ("strucfac.txt" if o["m3dsetsf"] else None)


_E = "e2refine"
OPTIONS: tuple[Option, ...] = (
    Option(
        "iter",
        ("refine.iterations",),
        0,
        "iterations: index one past the last to run (required)",
        int,
        "driver",
    ),
    Option("startiter", (), 0, "resume at this iteration of the --path folder", int, "driver"),
    Option("input", (), None, "particle stack (.star, .mrcs, .hdf, .lst)", str, "driver", True),
    Option(
        "model",
        (),
        "threed.0a.mrc",
        "starting map (resampled and clipped to the particles' Å/px and box if it differs)",
        str,
        "driver",
        True,
    ),
    Option("modelapix", (), 0.0, "Å/pixel of --model (0: its header's)", float, "driver"),
    Option(
        "usefilt",
        (),
        None,
        "filtered copy of the particles, used to align",
        str,
        "driver",
        True,
    ),
    Option("path", (), None, "output folder (default: the next refine_NN)", str, "driver"),
    Option(
        "mass",
        ("refine.mass_kda",),
        0.0,
        "particle mass in kDa: normalise threed_filt by mass",
        float,
        _E,
    ),
    Option("apix", (), 0.0, "Å/pixel of the particles (0: their header's)", float, _E),
    Option(
        "automask3d",
        ("refine.automask3d",),
        None,
        "threshold,radius,nshells,nshellsgauss,nmaxseed",
        str,
        _E,
    ),
    Option(
        "automaskalign",
        (),
        False,
        "mask alignment with the automask's projections (refused: not available)",
        bool,
        _E,
    ),
    Option(
        "sym",
        ("project3d.sym", "refine.sym", ("make3d.sym", _map_sym)),
        help="point-group symmetry (cN, dN, tet, oct, icos)",
    ),
    Option("projector", ("project3d.projector",), "standard"),
    Option(
        "orientgen",
        ("project3d.orientgen",),
        help="orientations (eman:...:breaksym=1 covers every symmetry copy; the map is then c1)",
    ),
    Option("simalign", ("simmx.align",)),
    Option("simaligncmp", ("simmx.aligncmp",), "ccc"),
    Option("simralign", ("simmx.ralign",)),
    Option("simraligncmp", ("simmx.raligncmp",), "ccc"),
    Option("simcmp", ("simmx.cmp",), "frc:zeromask=1:snrweight=1"),
    Option("simmask", ("simmx.mask",), file=True),
    Option("shrink", ("simmx.shrink",), 0, "shrink particles and projections in simmx (>= 2)"),
    Option(
        "twostage",
        (("simmx.twostage", lambda o: _twostage(o)),),
        "auto",
        "two-stage simmx (e2simmx2stage): the stage-1 shrink factor, 0 (off), or auto: "
        f"{AUTO_TWOSTAGE} with --localrefine auto and no --shrink (the global iterations "
        "then only need poses the local search can start from), else 0",
        str,
    ),
    Option(
        "prefilt",
        ("simmx.prefilt", "classaverage.prefilt"),
        help="filter each reference to the particle's spectrum before aligning (simmx and "
        "class averaging)",
    ),
    Option("simvec", ("classify.simvec",)),
    Option("sep", ("classify.sep", "refine.sep")),
    Option("classkeep", (("classaverage.keep", lambda o: o["classkeep"] or 1.0),)),
    Option("classkeepsig", ("classaverage.keepsig",)),
    Option("classiter", ("classaverage.iterations",)),
    Option("classalign", ("classaverage.align",)),
    Option("classaligncmp", ("classaverage.aligncmp",)),
    Option("classralign", ("classaverage.ralign",)),
    Option("classraligncmp", ("classaverage.raligncmp",)),
    Option("classaverager", ("classaverage.averager",)),
    Option("classcmp", ("classaverage.cmp",)),
    Option("classnormproc", ("classaverage.normproc",)),
    Option("classrefsf", ("classaverage.setsfref",)),
    Option("classautomask", ("classaverage.automask",)),
    Option(
        "pad",
        (("make3d.pad_px", lambda o: o["pad"] or None),),
        0,
        "padded size for reconstruction, px (0: twice the box)",
    ),
    Option("recon", ("make3d.recon",)),
    Option(
        "m3dkeep",
        (("make3d.keep", lambda o: o["m3dkeep"] if _classes(o) and o["m3dkeep"] else 1.0),),
        0.8,
        "fraction of class averages kept",
    ),
    Option(
        "m3dkeepsig",
        (("make3d.keepsig", lambda o: bool(o["m3dkeepsig"] and _classes(o) and o["m3dkeep"])),),
        help="--m3dkeep counts standard deviations",
    ),
    Option(
        "m3dsetsf",
        (("make3d.setsf", _setsf),),
        False,
        "impose strucfac.txt (working folder)",
        bool,
    ),
    Option("m3dsffile", (("make3d.setsf", _setsf),), file=True),
    Option(
        "m3diter",
        (("make3d.iterations", lambda o: o["m3diter"] if _classes(o) else 1),),
        2,
        "reconstruction passes",
    ),
    Option(
        "m3dpreprocess",
        (("make3d.preprocess", _preprocess),),
        None,
        "processor for each inserted image (default normalize.edgemean for class averages, "
        "none for particles)",
        str,
    ),
    Option(
        "m3dpostprocess",
        (("make3d.postprocess", lambda o: (o["m3dpostprocess"],) if o["m3dpostprocess"] else ()),),
        None,
        "processor for the map, in make3d",
        str,
    ),
    Option(
        "m3dpostprocess2",
        ("refine.postprocess2",),
        None,
        "processor for the map, after make3d",
        str,
        "make3d",
    ),
    Option(
        "lowmem",
        (),
        False,
        "smaller chunks for little memory: every stage's working-memory budget / 4",
        bool,
        "make3d",
    ),
    Option(
        "parallel",
        (),
        None,
        "thread:N: N cores (kernels, FFTs, CPU affinity); dask:local=N, dask:scheduler=ADDRESS, "
        "dask:jobqueue=slurm:cores=C:memory=M:jobs=J: a Dask cluster",
        str,
        "driver",
    ),
    Option(
        "seed",
        (("refine.seed", lambda o: int(o["seed"] or 0)),),
        None,
        "random seed (default: drawn and recorded)",
        int,
    ),
    Option(
        "goldstandard",
        (("refine.goldstandard", lambda o: bool(o["goldstandard"])),),
        1,
        "1: refine two independent halves; 0: one chain",
        int,
    ),
    Option(
        "inires",
        ("refine.inires_a",),
        30.0,
        "gold standard: halves start at this resolution, Å",
        float,
    ),
    Option(
        "m3dsource",
        ("refine.m3dsource",),
        "particles",
        "reconstruct from particles (with CTF) or classes (as e2refine)",
        str,
    ),
    Option(
        "earlystop",
        (("refine.earlystop", lambda o: bool(o["earlystop"])),),
        1,
        "1: stop once resolution and orientations settle",
        int,
    ),
    Option(
        "localrefine",
        ("refine.localrefine",),
        "auto",
        "auto: global iterations until they settle (median orientation change under the "
        "angular step, or under 1% resolution gain), then every particle refined around "
        "its pose, the radius halving "
        "while the resolution improves; 0: global only (e2refine); 1: local from the first "
        "iteration, around the input's poses. Parameters :range=DEG (first radius; the "
        "angular step), :step=DEG (grid; half the radius), :shift=PX (2), "
        ":score=ssnr|simcmp (auto: ssnr, 1: simcmp)",
        str,
    ),
    Option(
        "fscmask",
        ("refine.fscmask",),
        None,
        f"mask (0-1 map) for the half-map FSC (default: the particle grown "
        f"{FSC_MASK_EXTEND_A:g} Å, {FSC_MASK_SOFT_EDGE_A:g} Å soft edge)",
        str,
        file=True,
    ),
)
#: what refine gives each stage whatever the options (as e2refine)
FIXED: dict[str, Any] = {
    "project3d.postprocess": ("normalize.circlemean",),
    "make3d.keepabs": True,
}
BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Inert:
    """Options that cannot act in a combination: ``applies(opts)`` says when, ``where``
    says it in words (for the warning and ``--help``)."""

    names: tuple[str, ...]
    where: str
    applies: Callable[[dict[str, Any]], bool]


#: what only a global iteration uses (projections, simmx, classes, class averages)
_GLOBAL_ONLY = (
    "projector",
    "simalign",
    "simaligncmp",
    "simralign",
    "simraligncmp",
    "simmask",
    "shrink",
    "twostage",
    "prefilt",
    "simvec",
    "sep",
    "classiter",
    "classalign",
    "classaligncmp",
    "classralign",
    "classraligncmp",
    "classaverager",
    "classcmp",
    "classnormproc",
    "classrefsf",
    "classautomask",
    "m3dsource",
    "m3dkeep",
    "m3dkeepsig",
    "m3diter",
)
#: every combination in which an option is accepted but has no effect
INERT: tuple[Inert, ...] = (
    Inert(
        ("m3dkeep", "m3dkeepsig", "m3diter"),
        "with --m3dsource particles (they rate class averages)",
        lambda o: o["m3dsource"] == "particles",
    ),
    Inert(("m3dkeepsig",), "with --m3dkeep 0", lambda o: not o["m3dkeep"]),
    Inert(("m3dsetsf",), "with --m3dsffile (that file is imposed)", lambda o: bool(o["m3dsffile"])),
    Inert(("automask3d",), "without --mass", lambda o: not o["mass"]),
    Inert(("inires",), "with --goldstandard 0", lambda o: not o["goldstandard"]),
    Inert(("simaligncmp",), "with --simalign none", lambda o: _none(o["simalign"]) is None),
    Inert(("simraligncmp",), "without --simralign", lambda o: _none(o["simralign"]) is None),
    Inert(("classraligncmp",), "without --classralign", lambda o: _none(o["classralign"]) is None),
    Inert(
        ("classalign", "classaligncmp", "classralign", "classraligncmp"),
        "with --classiter 0 (members keep the classification's alignment)",
        lambda o: o["classiter"] == 0,
    ),
    Inert(
        _GLOBAL_ONLY,
        "with --localrefine 1 (every iteration is local: no projections or classes)",
        lambda o: _local_mode(o) == "1",
    ),
)


def _given(o: dict[str, Any], name: str) -> bool:
    """Whether option ``name`` was set to something other than its default."""
    default = BY_NAME[name].default
    value = o.get(name, default)
    if BY_NAME[name].type is str:
        return _none(value) != _none(default)
    return value != default


def inert_warnings(opts: dict[str, Any]) -> list[str]:
    """One line for each option given that cannot act with the others (:data:`INERT`)."""
    o = {**defaults(), **opts}
    out: dict[str, str] = {}
    for rule in INERT:
        for name in rule.names:
            if name not in out and _given(o, name) and rule.applies(o):
                value = "" if BY_NAME[name].type is bool else f" {o[name]}"
                out[name] = f"warning: --{name}{value} has no effect {rule.where}"
    return list(out.values())


def help_text(option: Option) -> str:
    """``option``'s help (its stage field's, naming options as ``refine`` spells them),
    with the combinations in which it has no effect."""
    text = option.help
    if text is None:
        config, f = option.stage_field
        text = option_help(f, stage_spelling(config.STAGE))
    where = [r.where for r in INERT if option.name in r.names]
    return text + ("; no effect " + " or ".join(where) if where else "")


#: options that may differ between a run and its resumption
RESUME_FREE = ("startiter", "parallel", "lowmem", "check", "verbose", "path")


def defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def _none(text: str | None) -> str | None:
    """e2refine's ``None``/"none" spelled for a disabled modifier option."""
    return None if text is None or str(text).strip().lower() in ("", "none") else text


def stage_spelling(stage: str, opts: dict[str, Any] | None = None) -> dict[str, str]:
    """Each option field of ``stage`` spelled as ``refine`` spells it (``--keep`` of class
    averaging is ``--classkeep``); a field no option sets keeps the stage's spelling. Of
    two options that set one field, the one given in ``opts`` names it."""
    out = dict(STAGE_CONFIGS[stage].flags())
    o = None if opts is None else {**defaults(), **opts}
    named: set[str] = set()
    for opt in OPTIONS:
        given = o is not None and _given(o, opt.name)
        for target, _ in opt.targets:
            where, name = target.split(".")
            if where == stage and (given or name not in named):
                out[name] = f"--{opt.name}"
                named.update([name] if given else [])
    return out


def refine_spelling(err: CryorefineError, opts: dict[str, Any] | None = None) -> CryorefineError:
    """``err`` with a stage's options spelled as ``refine`` spells them
    (:func:`stage_spelling`); an error that names no stage option as it is."""
    if isinstance(err, OptionError):
        return err.spelled(stage_spelling(err.stage, opts))
    return err


def _check(o: dict[str, Any]) -> None:
    """Refuse the values and combinations no configuration can check alone."""
    if o["iter"] is None or o["iter"] < 1:
        raise CryorefineError(f"--iter {o['iter']}: give the number of iterations (>= 1)")
    if o["automaskalign"]:
        raise CryorefineError(
            "--automaskalign: masking alignment by projections is not available yet"
        )
    if o["mass"] and not o["apix"]:
        raise CryorefineError("--mass needs --apix (the mass normalisation's pixel size)")
    for name in ("apix", "modelapix"):
        if o[name] < 0:
            raise CryorefineError(f"--{name} {o[name]}: must be positive")
    for name in ("goldstandard", "earlystop"):
        if o[name] not in (0, 1):
            raise CryorefineError(f"--{name} {o[name]}: use 1 (on) or 0 (off)")
    if o["fscmask"] and not o["goldstandard"]:
        raise CryorefineError("--fscmask: masks the half-map FSC, which needs --goldstandard 1")


def refine_config(opts: dict[str, Any]) -> RefineConfig:
    """The :class:`RefineConfig` of e2refine options ``opts`` (names as :data:`OPTIONS`):
    each option's value goes to the fields it names (:attr:`Option.to`), with
    :data:`FIXED`.

    Every modifier string is parsed (and files named in it read) here; an error names
    the option as ``refine`` spells it.
    """
    o = {**defaults(), **opts}
    _check(o)
    fields: dict[str, dict[str, Any]] = {"refine": {}, **{s: {} for s in STAGE_CONFIGS}}
    for target, value in FIXED.items():
        stage, name = target.split(".")
        fields[stage][name] = value
    for opt in OPTIONS:
        for target, value in opt.targets:
            stage, name = target.split(".")
            fields[stage][name] = o[opt.name] if value is None else value(o)
    stages = {}
    for stage, config in STAGE_CONFIGS.items():
        try:
            stages[stage] = config(**fields[stage])
        except CryorefineError as err:
            raise refine_spelling(err, o) from None
    return RefineConfig(**fields["refine"], **stages)


def differences(
    recorded: dict[str, Any], now: dict[str, Any], *, recorded_cwd: str | None = None
) -> list[str]:
    """The options that differ between a recorded run and now (``name: old -> new``).

    ``--iter`` may grow (a finished run extended); a file option is the same when both
    name the same file, the recorded name taken from ``recorded_cwd`` (the folder the
    run started in; ``None``: this one)."""
    out = []
    for name, opt in BY_NAME.items():
        old, new = recorded.get(name), now.get(name)
        if name in RESUME_FREE or name == "seed" and new is None:
            continue
        if name == "iter" and old is not None and new is not None and new >= old:
            continue
        if opt.file and old is not None and new is not None:
            if _resolved(old, recorded_cwd) == _resolved(new, None):
                continue
        if old != new:
            out.append(f"--{name}: {old!r} -> {new!r}")
    return out


def _resolved(name: str, cwd: str | None) -> Path:
    """The file ``name`` typed in folder ``cwd`` (``None``: this one), links resolved."""
    path = Path(name).expanduser()
    if cwd is not None and not path.is_absolute():
        path = Path(cwd) / path
    return path.resolve()


def eman2_commands(
    o: dict[str, Any], cfg: RefineConfig, iteration: int, path: str, search: Any = None
) -> dict[str, str]:
    """What each stage of one iteration ran, as the EMAN2 (2.99) command lines that do it
    (spec ch01 §2.2), ``"as EMAN2: ..."``, one per half joined by ``"; "``; the map
    from the particles as the RELION command that rebuilds it from
    ``particles_NN.star``, ``"as RELION: ..."``. Every file they name is one the
    refinement writes (:mod:`cryorefine.refine.outputs`): the halves' particle sets
    ``particles_even.lst``/``_odd``, their projections, matrices and class averages
    in EMAN2's layouts. What EMAN2 would do otherwise follows the command as a shell
    comment. Built from ``cfg`` (what runs), with ``o`` (the options) for spellings.
    ``search``: the iteration's (:class:`~cryorefine.refine.local.Search`); a local one
    adds what its ``local`` stage searched. Paths are as the run was given them: the
    lines run from the folder it ran in."""
    o = {**defaults(), **o}
    k = f"{iteration:02d}"
    gold = cfg.goldstandard
    halves = ("_even", "_odd") if gold else ("",)
    v = f" --verbose={o['verbose'] - 1}" if o.get("verbose", 0) > 0 else ""
    # EMAN2 knows thread:N, not dask: (its lines then run on its own default)
    given = o.get("parallel") or ""
    par = f" --parallel={given}" if given.startswith("thread:") else ""
    sim_cfg, m3d = cfg.simmx, cfg.make3d

    def f(stem: str, s: str, ext: str = ".hdf", it: str = k) -> str:
        return f"{path}/{stem}_{it}{s}{ext}"

    def model(s: str) -> str:
        if iteration == 0:
            return f"{path}/threed_start{s}.mrc" if gold else o["model"]
        last = f"{iteration - 1:02d}"
        return f("threed_filt" if cfg.mass_kda or not gold else "threed", s, ".mrc", last)

    ptcl = {s: f"{path}/particles{s}.lst" for s in halves}
    sim_in = {s: f"{path}/usefilt{s}.lst" for s in halves} if o["usefilt"] else ptcl
    proj = "; ".join(
        f"e2project3d.py {model(s)} --outfile={f('projections', s)} "
        f"{cfg.project3d.eman2_args()}{par}{v}"
        for s in halves
    )
    sim = "; ".join(
        f"e2simmx.py {f('projections', s)} {sim_in[s]} {f('simmx', s)} --saveali "
        f"{sim_cfg.eman2_args()}{v}{par}"
        for s in halves
    )
    if sim_cfg.twostage:
        sim += (
            f"  # --twostage {sim_cfg.twostage} (e2simmx2stage.py): only the cells of the "
            f"projections near each particle's best stage-1 averages were computed"
        )
    cls = "; ".join(
        f"e2classify.py {f('simmx', s)} {f('classify', s)} {cfg.classify.eman2_args()}{v}"
        for s in halves
    )
    ca = "; ".join(
        f"e2classaverage.py --input={ptcl[s]} --classmx={f('classify', s)} --storebad "
        f"--output={f('classes', s)} --ref={f('projections', s)} "
        f"--resultmx={f('cls_result', s)} {cfg.classaverage.eman2_args()}"
        + (f" --usefilt={sim_in[s]}" if o["usefilt"] else "")
        + v
        + par
        for s in halves
    )
    pre = ",".join(m3d.preprocess)
    post = "".join(f" --process={p}" for p in m3d.postprocess)
    if m3d.setsf:
        post = f" --setsf={m3d.setsf}" + post
    is_local = search is not None and search.kind == "local"
    notes = []
    if cfg.m3dsource == "classes" and not is_local:
        outs = [f("threed", s, ".mrc") for s in halves]
        make3d = "as EMAN2: " + "; ".join(
            f"e2make3d.py --input={f('classes', s)} --output={out} "
            + m3d.eman2_args()
            + (" --lowmem" if o["lowmem"] else "")
            + v
            for s, out in zip(halves, outs, strict=True)
        )
        post = ""
    else:  # every kept particle at its pose, with its CTF: particles_NN.star
        make3d = (
            f"as RELION: relion_reconstruct --i {path}/particles_{k}.star --o "
            f"{path}/threed_{k}.mrc --ctf --fom_weighting --sym {m3d.sym.upper()}"
        )
        outs = [f"{path}/threed_{k}.mrc"]
        if gold:
            notes.append("each half: --subset 1, --subset 2")
        if pre:
            notes.append(f"each image first e2proc2d.py --process={pre}")
    if cfg.postprocess2:
        post += f" --process={cfg.postprocess2}"
    if post:
        make3d += "; " + "; ".join(f"e2proc3d.py {out} {out}{post}" for out in outs)
    if notes:
        make3d += "  # " + "; ".join(notes)
    local = ""
    if is_local:
        local = (
            f"within {search.range_deg:g}° (grid {search.step_deg:g}°, polished to a tenth) "
            f"and {search.shift_px:g} px of each particle's last pose, score "
            f"{cfg.localrefine_mod.score}; e2refine has no local search (EMAN2's "
            "e2spa_refine.py --localrefine does one)"
        )
    return {
        "local": local,
        "project3d": f"as EMAN2: {proj}",
        "simmx": f"as EMAN2: {sim}",
        "classify": f"as EMAN2: {cls}",
        "classaverage": f"as EMAN2: {ca}",
        "make3d": make3d,
    }
