"""e2refine's options (spec ch01 §3), under their own names and defaults, plus ours.

:data:`OPTIONS` lists every option once: the command line builds its parser from it,
:func:`refine_config` turns the values into a :class:`RefineConfig` (parsing every
modifier string, so that a bad one is refused before any work), and
:func:`eman2_commands` writes the EMAN2 command line each stage stands for.
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
    breaks_symmetry,
)
from cryorefine.errors import CryorefineError, OptionError
from cryorefine.refine.step import FSC_MASK_EXTEND_A, FSC_MASK_SOFT_EDGE_A
from cryorefine.registry import ALIGNERS, AVERAGERS, PROJECTORS, RECONSTRUCTORS


@dataclass(frozen=True)
class Option:
    """One option: ``type`` is ``int``, ``float``, ``str`` or ``bool`` (a flag);
    ``file``: its value names a file (compared by resolved path on resume)."""

    name: str
    type: type
    default: Any
    help: str
    group: str = "refine"
    file: bool = False


_E = "e2refine"
OPTIONS: tuple[Option, ...] = (
    Option("iter", int, 0, "iterations: index one past the last to run (required)", "driver"),
    Option("startiter", int, 0, "resume at this iteration of the --path folder", "driver"),
    Option("input", str, None, "particle stack (.star, .mrcs, .hdf, .lst)", "driver", True),
    Option(
        "model",
        str,
        "threed.0a.mrc",
        "starting map (resampled and clipped to the particles' Å/px and box if it differs)",
        "driver",
        True,
    ),
    Option("modelapix", float, 0.0, "Å/pixel of --model (0: its header's)", "driver"),
    Option("usefilt", str, None, "filtered copy of the particles, used to align", "driver", True),
    Option("path", str, None, "output folder (default: the next refine_NN)", "driver"),
    Option("mass", float, 0.0, "particle mass in kDa: normalise threed_filt by mass", _E),
    Option("apix", float, 0.0, "Å/pixel of the particles (0: their header's)", _E),
    Option("automask3d", str, None, "threshold,radius,nshells,nshellsgauss,nmaxseed", _E),
    Option(
        "automaskalign",
        bool,
        False,
        "mask alignment with the automask's projections (refused: not available)",
        _E,
    ),
    Option("sym", str, "c1", "point-group symmetry (cN, dN, tet, oct, icos)", _E),
    Option("projector", str, "standard", f"projector ({PROJECTORS.help_list()})", _E),
    Option(
        "orientgen",
        str,
        "eman:delta=5.0:inc_mirror=0:perturb=1",
        "orientations (eman:...:breaksym=1 covers every symmetry copy; the map is then c1)",
        _E,
    ),
    Option(
        "simalign", str, "rotate_translate_flip", f"simmx aligner ({ALIGNERS.help_list()})", "simmx"
    ),
    Option("simaligncmp", str, "ccc", "comparator of --simalign", "simmx"),
    Option("simralign", str, None, f"simmx refining aligner ({ALIGNERS.help_list()})", "simmx"),
    Option("simraligncmp", str, "ccc", "comparator of --simralign", "simmx"),
    Option("simcmp", str, "frc:zeromask=1:snrweight=1", "simmx score comparator", "simmx"),
    Option("simmask", str, None, "2D mask image applied before the simmx score", "simmx", True),
    Option("shrink", int, 0, "shrink particles and projections in simmx (>= 2)", "simmx"),
    Option("twostage", int, 0, "two-stage simmx: the coarse stage's shrink (0: off)", "simmx"),
    Option(
        "prefilt",
        bool,
        False,
        "filter each reference to the particle's spectrum before aligning (simmx and "
        "class averaging)",
        "simmx",
    ),
    Option("simvec", bool, False, "classify by similarity-vector pattern", "classify"),
    Option("sep", int, 1, "classes each particle is assigned to", "classify"),
    Option("classkeep", float, 0.8, "fraction of each class kept (or sigmas)", "class"),
    Option("classkeepsig", bool, False, "--classkeep counts standard deviations", "class"),
    Option("classiter", int, 1, "class-averaging alignment rounds", "class"),
    Option(
        "classalign",
        str,
        "rotate_translate_flip",
        f"class-averaging aligner ({ALIGNERS.help_list()})",
        "class",
    ),
    Option("classaligncmp", str, "ccc", "comparator of --classalign", "class"),
    Option(
        "classralign",
        str,
        None,
        f"class-averaging refining aligner ({ALIGNERS.help_list()})",
        "class",
    ),
    Option("classraligncmp", str, "ccc", "comparator of --classralign", "class"),
    Option("classaverager", str, "mean", f"averager ({AVERAGERS.help_list()})", "class"),
    Option("classcmp", str, "frc:snrweight=1", "comparator rating class members", "class"),
    Option("classnormproc", str, "normalize.edgemean", "normalisation of members", "class"),
    Option("classrefsf", bool, False, "give the averages the projection's spectrum", "class"),
    Option("classautomask", bool, False, "2D automask of the running average", "class"),
    Option("pad", int, 0, "padded size for reconstruction, px (0: twice the box)", "make3d"),
    Option("recon", str, "fourier", f"reconstructor ({RECONSTRUCTORS.help_list()})", "make3d"),
    Option("m3dkeep", float, 0.8, "fraction of class averages kept", "make3d"),
    Option("m3dkeepsig", bool, False, "--m3dkeep counts standard deviations", "make3d"),
    Option("m3dsetsf", bool, False, "impose strucfac.txt (working folder)", "make3d"),
    Option("m3dsffile", str, None, "impose this structure factor file", "make3d", True),
    Option("m3diter", int, 2, "reconstruction passes", "make3d"),
    Option(
        "m3dpreprocess",
        str,
        None,
        "processor for each inserted image (default normalize.edgemean for class averages, "
        "none for particles)",
        "make3d",
    ),
    Option("m3dpostprocess", str, None, "processor for the map, in make3d", "make3d"),
    Option("m3dpostprocess2", str, None, "processor for the map, after make3d", "make3d"),
    Option("lowmem", bool, False, "accepted for e2refine command lines", "make3d"),
    Option(
        "parallel",
        str,
        None,
        "thread:N runs on N cores (kernels, FFTs, CPU affinity); mpi and dc refused",
        "driver",
    ),
    Option("seed", int, None, "random seed (default: drawn and recorded)", "cryorefine"),
    Option("goldstandard", int, 1, "1: refine two independent halves; 0: one chain", "cryorefine"),
    Option(
        "inires", float, 30.0, "gold standard: halves start at this resolution, Å", "cryorefine"
    ),
    Option(
        "m3dsource",
        str,
        "particles",
        "reconstruct from particles (with CTF) or classes (as e2refine)",
        "cryorefine",
    ),
    Option("earlystop", int, 1, "1: stop once resolution and orientations settle", "cryorefine"),
    Option(
        "fscmask",
        str,
        None,
        f"mask (0-1 map) for the half-map FSC (default: the particle grown "
        f"{FSC_MASK_EXTEND_A:g} Å, {FSC_MASK_SOFT_EDGE_A:g} Å soft edge)",
        "cryorefine",
        True,
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Inert:
    """Options that cannot act in a combination: ``applies(opts)`` says when, ``where``
    says it in words (for the warning and ``--help``)."""

    names: tuple[str, ...]
    where: str
    applies: Callable[[dict[str, Any]], bool]


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
    Inert(("lowmem",), "(memory is always bounded)", lambda o: True),
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
    """``option``'s help, with the combinations in which it has no effect."""
    where = [r.where for r in INERT if option.name in r.names]
    return option.help + ("; no effect " + " or ".join(where) if where else "")


#: options that may differ between a run and its resumption
RESUME_FREE = ("startiter", "parallel", "check", "verbose", "path")


def defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def _none(text: str | None) -> str | None:
    """e2refine's ``None``/"none" spelled for a disabled modifier option."""
    return None if text is None or str(text).strip().lower() in ("", "none") else text


#: each stage's option names as e2refine spells them
_RENAMES = {
    "simmx": {
        "--align": "--simalign",
        "--aligncmp": "--simaligncmp",
        "--ralign": "--simralign",
        "--raligncmp": "--simraligncmp",
        "--cmp": "--simcmp",
        "--mask": "--simmask",
    },
    "class": {
        "--iter": "--classiter",
        "--keep": "--classkeep",
        "--keepsig": "--classkeepsig",
        "--align": "--classalign",
        "--aligncmp": "--classaligncmp",
        "--ralign": "--classralign",
        "--raligncmp": "--classraligncmp",
        "--cmp": "--classcmp",
        "--averager": "--classaverager",
        "--normproc": "--classnormproc",
    },
    "make3d": {
        "--iter": "--m3diter",
        "--keep": "--m3dkeep",
        "--keepsig": "--m3dkeepsig",
        "--preprocess": "--m3dpreprocess",
        "--postprocess": "--m3dpostprocess",
        "--setsf": "--m3dsffile",
    },
}


def _stage(family: str, factory, *, renames: dict[str, str] | None = None, **kwargs):
    """Build a stage config; an error names the options as e2refine calls them
    (``renames``: spellings that depend on the options given)."""
    try:
        return factory(**kwargs)
    except CryorefineError as err:
        raise refine_spelling(err, family, renames) from None


#: the option family of each stage's errors (:class:`OptionError` ``stage``)
_FAMILY = {"simmx": "simmx", "classaverage": "class", "make3d": "make3d"}


def refine_spelling(
    err: CryorefineError, family: str | None = None, extra: dict[str, str] | None = None
) -> CryorefineError:
    """``err`` (raised by a stage of ``family``, or by the stage it names) with its
    options spelled as ``refine`` spells them (``--keep`` of class averaging is
    ``--classkeep``; ``extra``: more spellings)."""
    if isinstance(err, OptionError):
        renames = {**_RENAMES.get(_FAMILY.get(err.stage, ""), {}), **(extra or {})}
        return err.spelled({f: renames.get(flag, flag) for f, flag in err.flags.items()})
    renames = {**_RENAMES.get(family or "", {}), **(extra or {})}
    text = str(err)
    for old in sorted(renames, key=len, reverse=True):
        if text.startswith(old) and not text[len(old) : len(old) + 1].isalnum():
            return CryorefineError(renames[old] + text[len(old) :])
    return err


def refine_config(opts: dict[str, Any]) -> RefineConfig:
    """The :class:`RefineConfig` of e2refine options ``opts`` (names as :data:`OPTIONS`).

    Every modifier string is parsed (and files named in it read) here.
    """
    o = {**defaults(), **opts}
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
    if o["goldstandard"] not in (0, 1):
        raise CryorefineError(f"--goldstandard {o['goldstandard']}: use 1 (on) or 0 (off)")
    if o["earlystop"] not in (0, 1):
        raise CryorefineError(f"--earlystop {o['earlystop']}: use 1 (on) or 0 (off)")
    if o["fscmask"] and not o["goldstandard"]:
        raise CryorefineError("--fscmask: masks the half-map FSC, which needs --goldstandard 1")
    if o["classiter"] < 0:
        raise CryorefineError(f"--classiter {o['classiter']}: must be 0 or more")
    classes = o["m3dsource"] == "classes"
    pre = _none(o["m3dpreprocess"])
    if o["m3dpreprocess"] is None and classes:
        pre = "normalize.edgemean"
    setsf = o["m3dsffile"] or ("strucfac.txt" if o["m3dsetsf"] else None)
    keep = o["m3dkeep"] if classes and o["m3dkeep"] else 1.0
    project3d = Project3dConfig(
        orientgen=o["orientgen"],
        sym=o["sym"],
        projector=o["projector"],
        postprocess=("normalize.circlemean",),
    )
    make3d = _stage(
        "make3d",
        Make3dConfig,
        renames={"--setsf": "--m3dsffile" if o["m3dsffile"] else "--m3dsetsf"},
        sym="c1" if breaks_symmetry(project3d.orientgen_mod) else o["sym"],
        pad_px=o["pad"] or None,
        recon=o["recon"],
        preprocess=(pre,) if pre else (),
        postprocess=(o["m3dpostprocess"],) if o["m3dpostprocess"] else (),
        setsf=setsf,
        iterations=o["m3diter"] if classes else 1,
        keep=keep,
        keepsig=bool(o["m3dkeepsig"] and classes and o["m3dkeep"]),
        keepabs=True,
    )
    return RefineConfig(
        iterations=o["iter"],
        sym=o["sym"],
        sep=o["sep"],
        m3dsource=o["m3dsource"],
        project3d=project3d,
        simmx=_stage(
            "simmx",
            SimmxConfig,
            align=o["simalign"],
            aligncmp=o["simaligncmp"],
            ralign=o["simralign"],
            raligncmp=o["simraligncmp"],
            cmp=o["simcmp"],
            mask=o["simmask"],
            shrink=o["shrink"] or None,
            prefilt=o["prefilt"],
            twostage=o["twostage"],
        ),
        classify=ClassifyConfig(sep=o["sep"], simvec=o["simvec"]),
        classaverage=_stage(
            "class",
            ClassaverageConfig,
            iterations=o["classiter"],
            keep=o["classkeep"] if o["classkeep"] else 1.0,
            keepsig=o["classkeepsig"],
            align=o["classalign"],
            aligncmp=o["classaligncmp"],
            ralign=o["classralign"],
            raligncmp=o["classraligncmp"],
            cmp=o["classcmp"],
            averager=o["classaverager"],
            normproc=o["classnormproc"],
            setsfref=o["classrefsf"],
            automask=o["classautomask"],
            prefilt=o["prefilt"],
        ),
        make3d=make3d,
        goldstandard=bool(o["goldstandard"]),
        inires_a=o["inires"],
        seed=int(o["seed"] or 0),
        mass_kda=o["mass"],
        automask3d=o["automask3d"],
        postprocess2=o["m3dpostprocess2"],
        earlystop=bool(o["earlystop"]),
        fscmask=o["fscmask"],
    )


def parallel_cores(spec: str | None) -> int | None:
    """Cores of ``--parallel thread:N`` (``None`` when not given)."""
    if spec is None:
        return None
    parts = spec.split(":")
    if parts[0] == "thread" and len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) > 0:
        return int(parts[1])
    if parts[0] in ("mpi", "dc"):
        raise CryorefineError(f"--parallel {spec}: {parts[0]} parallelism is not available yet")
    raise CryorefineError(f"--parallel {spec}: use thread:N (N cores)")


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
    o: dict[str, Any], cfg: RefineConfig, iteration: int, path: str
) -> dict[str, str]:
    """What each stage of one iteration ran, as the EMAN2 command line that does it
    (spec ch01 §2.2), ``"as EMAN2: ..."``; the map from the particles as the RELION
    command that rebuilds it from ``particles_NN.star``, ``"as RELION: ..."``. Built
    from ``cfg`` (what runs), with ``o`` (the options) for file names and spellings."""
    o = {**defaults(), **o}
    k = f"{iteration:02d}"
    prev = "" if iteration == 0 else f"{path}/threed_filt_{iteration - 1:02d}.hdf"
    model = o["model"] if iteration == 0 else prev
    ptcl = o["usefilt"] or o["input"]
    v = f" --verbose={o['verbose'] - 1}" if o.get("verbose", 0) > 0 else ""
    par = f" --parallel={o['parallel']}" if o.get("parallel") else ""
    sim_cfg, ca_cfg, m3d = cfg.simmx, cfg.classaverage, cfg.make3d
    proj = (
        f"e2project3d.py {model} -f --sym={cfg.sym} --projector={o['projector']} "
        f"--outfile={path}/projections_{k}.hdf --orientgen={o['orientgen']} "
        f"--postprocess=normalize.circlemean{par}{v}"
    )
    tail = f" --cmp={sim_cfg.cmp} --align={sim_cfg.align} --aligncmp={sim_cfg.aligncmp}"
    tail += " --prefilt" if sim_cfg.prefilt else ""
    tail += f" --mask={sim_cfg.mask}" if sim_cfg.mask else ""
    if sim_cfg.ralign_mod is not None:
        tail += f" --ralign={sim_cfg.ralign} --raligncmp={sim_cfg.raligncmp}"
    tail += f"{v}{par}" + (f" --shrink={sim_cfg.shrink}" if sim_cfg.shrink else "")
    if sim_cfg.twostage:
        sim = (
            f"e2simmx2stage.py {path}/projections_{k}.hdf {ptcl} {path}/simmx_{k}.hdf "
            f"{path}/proj_simmx_{k}.hdf {path}/proj_stg1_{k}.hdf {path}/simmx_stg1_{k}.hdf "
            f"-f --saveali --shrinks1={sim_cfg.twostage}" + tail
        )
    else:
        sim = (
            f"e2simmx.py {path}/projections_{k}.hdf {ptcl} {path}/simmx_{k}.hdf -f --saveali" + tail
        )
    cls = f"e2classify.py {path}/simmx_{k}.hdf {path}/classify_{k}.hdf --sep={cfg.sep} -f"
    cls += (" --simvec" if cfg.classify.simvec else "") + v
    ca = (
        f"e2classaverage.py --input={o['input']} --classmx={path}/classify_{k}.hdf --storebad "
        f"--output={path}/classes_{k}.hdf --ref={path}/projections_{k}.hdf "
        f"--iter={ca_cfg.iterations} -f --resultmx={path}/cls_result_{k}.hdf "
        f"--normproc={ca_cfg.normproc} --averager={ca_cfg.averager}"
        + (" --setsfref" if ca_cfg.setsfref else "")
        + (" --automask" if ca_cfg.automask else "")
        + f" --keep={ca_cfg.keep:.6f}"
        + (" --keepsig" if ca_cfg.keepsig else "")
        + f" --cmp={ca_cfg.cmp} --align={ca_cfg.align} --aligncmp={ca_cfg.aligncmp}"
        + (
            f" --ralign={ca_cfg.ralign} --raligncmp={ca_cfg.raligncmp}"
            if ca_cfg.ralign_mod is not None
            else ""
        )
        + (f" --usefilt={o['usefilt']}" if o["usefilt"] else "")
        + v
        + (" --prefilt" if ca_cfg.prefilt else "")
        + par
    )
    out = f"{path}/threed_{k}.hdf"
    pre = ",".join(m3d.preprocess)
    post = "".join(f" --process={p}" for p in m3d.postprocess)
    if m3d.setsf:
        post = f" --setsf={m3d.setsf}" + post
    if cfg.m3dsource == "classes":
        make3d = (
            f"as EMAN2: e2make3d.py --input={path}/classes_{k}.hdf --iter={m3d.iterations} -f "
            f"--keepabs --sym={m3d.sym} --recon={m3d.recon} --output={out}"
            + (f" --preprocess={pre}" if pre else "")
            + "".join(f" --postprocess={p}" for p in m3d.postprocess)
            + (f" --keep={m3d.keep:.6f}" if m3d.keep < 1 or m3d.keepsig else "")
            + (" --keepsig" if m3d.keepsig else "")
            + (f" --setsf={m3d.setsf}" if m3d.setsf else "")
            + (" --lowmem" if o["lowmem"] else "")
            + (f" --pad={m3d.pad_px}" if m3d.pad_px else "")
            + v
        )
        post = ""
    else:  # every kept particle at its pose, with its CTF: particles_NN.star
        halves = " (each half: --subset 1, --subset 2)" if cfg.goldstandard else ""
        make3d = (
            f"as RELION: relion_reconstruct --i {path}/particles_{k}.star --o "
            f"{path}/threed_{k}.mrc --ctf --fom_weighting --sym {m3d.sym.upper()}{halves}"
            + (f"; each image first e2proc2d.py --process={pre}" if pre else "")
        )
        out = f"{path}/threed_{k}.mrc"
    if cfg.postprocess2:
        post += f" --process={cfg.postprocess2}"
    if post:
        make3d += f"; then e2proc3d.py {out} {out}{post}"
    return {
        "project3d": f"as EMAN2: {proj}",
        "simmx": f"as EMAN2: {sim}",
        "classify": f"as EMAN2: {cls}",
        "classaverage": f"as EMAN2: {ca}",
        "make3d": make3d,
    }
