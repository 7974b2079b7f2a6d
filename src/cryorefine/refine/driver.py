"""The refinement driver: ``cryorefine refine`` (EMAN2 e2refine, spec ch01).

:func:`prepare` checks every input and option before any work (the same checks
``--check`` runs) and returns a :class:`Run`; :func:`refine` runs its iterations in an
output folder: each calls the stages in memory (:func:`cryorefine.refine.step.run_step`),
writes the iteration's files atomically, records the iteration in
``0_refine_parms.json``, appends to ``run.log`` (with each stage's EMAN2 command line
and time) and refreshes ``report.html``.

The output folder (``--path``, else the next ``refine_NN``) is created by the run, and
removed again if the run cannot start. A model at another pixel size or box is
resampled and clipped to the particles' as e2refine does.

Resume (``--startiter k``): the options must equal the recorded ones (``--iter`` may
grow, to extend a finished run; files are compared by resolved path; a record from
before an option existed gives it its default, :func:`upgrade_record`); iteration
``k - 1`` must be recorded complete; iteration ``k`` starts from its maps and reuses
the similarity and classification matrices a killed run left complete. Every random
choice derives from the recorded seed, so a resumed run reaches the same maps as an
uninterrupted one.

Search plan (``--localrefine``, :func:`plan_search`): global iterations (e2refine's
chain) until they settle: the median orientation change between the last two falls
below the angular step of ``--orientgen``, or the resolution gains less than 1%
(``auto``; never with ``0``; from the start with ``1``); then
local ones (:mod:`cryorefine.refine.local`), the first over a radius of that step (or
``range=``), each next one over half the radius while the resolution improves by at
least 1%, down to :data:`~cryorefine.refine.local.MIN_RANGE_DEG`.

Stopping rule: after at least three iterations, stop when the half-map resolution
improved by less than 1% over the last iteration and the median orientation change
is below the angular step, in a global phase that will not turn local; in a local
phase, after at least two local iterations, when the resolution improved by less than
1% and the median change is below the search radius.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryorefine import __version__, memory, parallel
from cryorefine.config import RefineConfig
from cryorefine.errors import CryorefineError, CryorefineWarning, OptionError
from cryorefine.fourier.fft import rescale_to_box
from cryorefine.fourier.fsc import resolution_at
from cryorefine.geometry.orientations import angular_step_deg
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.atomic import atomic_output, is_file
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.stacks import ParticleStack, ref_path, star_image_names, write_stack
from cryorefine.io.star import read_poses_star
from cryorefine.parallel import ParallelSpec, parse_parallel
from cryorefine.refine import outputs, report
from cryorefine.refine.local import MIN_RANGE_DEG, Search, run_local_step
from cryorefine.refine.options import (
    defaults,
    differences,
    eman2_commands,
    inert_warnings,
    refine_config,
    refine_spelling,
)
from cryorefine.refine.step import (
    REASONS,
    Step,
    check_inires,
    filtered,
    half_sets,
    run_step,
    start_maps,
)
from cryorefine.stages.classify import ClassMx

PARMS = "0_refine_parms.json"
#: layout of ``0_refine_parms.json`` (:func:`upgrade_record` reads older ones)
RECORD_VERSION = 2
#: relative resolution gain below which the map counts as settled
SETTLED_GAIN = 0.01
#: iterations run before the stopping rule may stop a run
MIN_ITERATIONS = 3


@dataclass
class Run:
    """A checked refinement: options, config, particles, starting map and folder."""

    opts: dict[str, Any]
    cfg: RefineConfig
    stack: ParticleStack
    usefilt: ParticleStack | None
    model: np.ndarray
    path: Path | None
    #: ``--parallel`` (:func:`cryorefine.parallel.parse_parallel`)
    parallel: ParallelSpec
    #: one line per option that has no effect with the others (:func:`inert_warnings`)
    warnings: list[str] = field(default_factory=list)
    #: the checks' warnings (already shown on the console), for ``run.log``
    notes: list[str] = field(default_factory=list)

    @property
    def apix(self) -> float:
        return self.stack.apix

    def close(self) -> None:
        self.stack.close()
        if self.usefilt is not None:
            self.usefilt.close()


def prepare(opts: dict[str, Any]) -> Run:
    """Check every input and option (spec ch01 §6, and every modifier string); open the
    particles and read the starting map. No file is written."""
    opts = {**defaults(), **opts}
    if not opts.get("input"):
        raise CryorefineError("--input: give the particle stack")
    spec = parse_parallel(opts.get("parallel"))
    cfg = refine_config(opts)
    model_path = Path(opts["model"])
    if not is_file(model_path):
        raise CryorefineError(f"--model {model_path}: not found")
    apix = opts.get("apix") or None
    stack = ParticleStack.from_path(opts["input"], apix=apix)
    usefilt = None
    try:
        n = stack.box
        if len(np.unique(np.round(stack.meta.apix, 4))) > 1 and not apix:
            raise CryorefineError(
                f"--input {opts['input']}: optics groups of different pixel sizes "
                f"({', '.join(f'{a:g}' for a in np.unique(stack.meta.apix))} Å)"
            )
        model, note = _fit_model(opts, read_map(model_path, no_apix_ok=True), stack)
        if cfg.goldstandard:
            check_inires(cfg.inires_a, stack.apix)
        if cfg.fscmask_map is not None and cfg.fscmask_map.shape != (n, n, n):
            raise CryorefineError(
                f"--fscmask {opts['fscmask']}: box {cfg.fscmask_map.shape[-1]} px; the "
                f"particles ({opts['input']}) are {n} px"
            )
        if opts.get("usefilt"):
            usefilt = ParticleStack.from_path(opts["usefilt"], apix=stack.apix)
            if len(usefilt) != len(stack) or usefilt.box != n:
                raise CryorefineError(
                    f"--usefilt {opts['usefilt']}: {len(usefilt)} images of {usefilt.box} px; "
                    f"--input holds {len(stack)} of {n} px"
                )
            usefilt = usefilt.with_meta(stack.meta)
        _check_ctf_and_pad(opts, cfg, stack)
        if cfg.localrefine_mod.mode == "local" and not stack.meta.has_orientation.all():
            raise CryorefineError(
                f"--localrefine {opts['localrefine']}: --input {opts['input']} has particles "
                "without orientations to start from (use auto)"
            )
        if cfg.goldstandard and len(stack) < 4:
            raise CryorefineError(f"--input {opts['input']}: too few particles for two halves")
        path = Path(opts["path"]) if opts.get("path") else None
        if path is not None and path.exists() and not path.is_dir():
            raise CryorefineError(f"--path {path}: is a file, not a folder")
    except BaseException:
        stack.close()
        if usefilt is not None:
            usefilt.close()
        raise
    notes = [note] if note else []
    for text in notes:
        warnings.warn(text, CryorefineWarning, stacklevel=2)
    return Run(
        opts,
        cfg,
        stack,
        usefilt,
        model.astype(np.float32),
        path,
        spec,
        warnings=inert_warnings(opts),
        notes=notes,
    )


def _fit_model(
    opts: dict[str, Any], model: Map, stack: ParticleStack
) -> tuple[np.ndarray, str | None]:
    """The starting map on the particles' pixel size and box. A map at another pixel
    size (``--modelapix``, else its header) is resampled in Fourier space and clipped
    or padded, centre on centre, as e2refine does (with one warning line); one with no
    pixel size and no ``--modelapix`` is taken to span the particles' box (e2refine:
    "A/pix unknown, assuming scale same as relative box size")."""
    n, n_m, apix = stack.box, model.box, stack.apix
    given = float(opts.get("modelapix") or 0.0)
    m_apix = given or model.apix
    guessed = m_apix <= 0
    if guessed:
        m_apix = apix * n / n_m
    if n_m == n and np.isclose(m_apix, apix, rtol=1e-3):
        return model.data, None
    data, got = rescale_to_box(model.data, m_apix, n, apix)
    span, extent = n_m * m_apix, n * apix  # Å
    steps = []
    if not np.isclose(m_apix, apix, rtol=1e-3):
        steps.append(f"resampled in Fourier space to {got:.4g} Å/px (scale {m_apix / got:.4f})")
    if not np.isclose(span, extent, rtol=1e-3):
        steps.append(f"{'clipped' if span > extent else 'padded'} to {n} px")
    source = (
        "no pixel size in its header (give --modelapix); taken to span the particles' box, "
        if guessed
        else ""
    )
    return data, (
        f"--model {opts['model']}: {source}{n_m} px at {m_apix:.4g} Å/px; the particles "
        f"({opts['input']}) are {n} px at {apix:.4g} Å/px: {', '.join(steps)}"
    )


def _check_ctf_and_pad(opts: dict[str, Any], cfg: RefineConfig, stack: ParticleStack) -> None:
    """Refuse a comparator weighting by the particles' SNR (``snrweight=1``, the default
    of --simcmp and --classcmp) on particles without CTF, and a --pad under the box."""
    if not stack.meta.ctf.known.all():
        missing = int(np.sum(~stack.meta.ctf.known))
        for prefix, stage in (("sim", cfg.simmx), ("class", cfg.classaverage)):
            for role in ("cmp", "aligncmp", "raligncmp"):
                mod = getattr(stage, f"{role}_mod")
                if mod is None or not mod.params.get("snrweight"):
                    continue
                name = prefix + role
                raise CryorefineError(
                    f"--{name} {opts[name]}: snrweight=1 needs the particles' CTF; "
                    f"{missing} of {len(stack)} particles of {opts['input']} have none "
                    "(drop snrweight=1)"
                )
    if cfg.make3d.pad_px is not None and cfg.make3d.pad_px < stack.box:
        raise CryorefineError(
            f"--pad {cfg.make3d.pad_px}: smaller than the particles' box ({stack.box} px)"
        )


def next_refine_folder(root: Path = Path(".")) -> Path:
    """Create and return ``refine_NN``: one more than the largest existing (e2refine_easy)."""
    while True:
        taken = [int(p.name[7:]) for p in root.glob("refine_*") if p.name[7:].isdigit()]
        path = root / f"refine_{max(taken, default=0) + 1:02d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took it first
            continue


#: the refinement's log: ``run.log`` gets every record, the console INFO and above
#: (DEBUG too with ``--verbose``); a library caller may route it like any logger
LOGGER = logging.getLogger("cryorefine.refine")
#: the level of the lines shown only with ``--verbose 2`` (each stage's time and command)
DETAIL = logging.DEBUG - 5


class Log:
    """``run.log`` through :data:`LOGGER`: timestamped plain lines, flushed as written.

    ``log(text)`` records ``text`` at DEBUG (``run.log``; the console too with
    ``--verbose 1``), ``log(text, level=2)`` below DEBUG (the console with ``--verbose
    2``), ``log(text, echo=True)`` at INFO (always the console too). ``console``: add a
    handler printing to standard output for the run; without it the records reach only
    ``run.log`` and whatever handlers the caller set up.
    """

    def __init__(self, path: Path, verbose: int, *, console: bool = True) -> None:
        self.handlers: list[logging.Handler] = []
        file = logging.FileHandler(path, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        file.setLevel(DETAIL)
        self.handlers.append(file)
        if console:
            screen = logging.StreamHandler(sys.stdout)
            screen.setFormatter(logging.Formatter("%(message)s"))
            screen.setLevel(logging.INFO - 10 * verbose if verbose < 2 else DETAIL)
            self.handlers.append(screen)
        for h in self.handlers:
            LOGGER.addHandler(h)
        self.level = LOGGER.level
        LOGGER.setLevel(DETAIL)

    def __call__(self, text: str, *, echo: bool = False, level: int = 1) -> None:
        record = logging.INFO if echo else (logging.DEBUG if level <= 1 else DETAIL)
        for line in text.splitlines():
            LOGGER.log(record, line)

    def close(self) -> None:
        for h in self.handlers:
            LOGGER.removeHandler(h)
            h.close()
        LOGGER.setLevel(self.level)


def _write_json(path: Path, record: dict) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=_plain) + "\n")


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v))


def upgrade_record(record: dict, where: Path) -> dict:
    """A parameter record read from ``where`` in this version's layout
    (:data:`RECORD_VERSION`). Version 1 (no ``record_version``) lacks ``cwd``, the
    folder the run started in (its file options are then read from this one). Any
    version: an option added since the record was written takes its default."""
    version = int(record.get("record_version", 1))
    if version > RECORD_VERSION:
        raise CryorefineError(
            f"{where}: record version {version} is newer than this cryorefine reads "
            f"({RECORD_VERSION}); resume it with the cryorefine that wrote it"
        )
    if version < 2:
        record["cwd"] = None
    options = record.setdefault("options", {})
    for name, value in defaults().items():
        options.setdefault(name, value)
    record["record_version"] = RECORD_VERSION
    return record


def _new_folder(path: Path) -> Path | None:
    """Create ``path`` (and its missing parents); return the top-most folder created,
    or ``None`` when ``path`` already exists."""
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # there already (or made by another run just now)
        return None
    except OSError as err:
        raise CryorefineError(f"--path {path}: cannot create it ({err.strerror})") from None
    return top


def _setup_folder(run: Run) -> tuple[Path, dict, int, Path | None]:
    """The output folder, its parameter record, the first iteration to run and the
    top-most folder created for the run (``None`` when it existed)."""
    opts, start = run.opts, int(run.opts.get("startiter") or 0)
    record_opts = {k: v for k, v in opts.items() if k not in ("check", "verbose")}
    if start > 0:
        if run.path is None:
            raise CryorefineError("--startiter: give the --path of the run to resume")
        parms = run.path / PARMS
        if not parms.is_file():
            raise CryorefineError(f"--path {run.path}: no {PARMS}; nothing to resume")
        record = upgrade_record(json.loads(parms.read_text()), parms)
        diff = differences(record["options"], record_opts, recorded_cwd=record["cwd"])
        if diff:
            raise CryorefineError(
                f"--startiter {start}: options differ from {parms}: " + "; ".join(diff)
            )
        if run.cfg.iterations <= start:
            raise CryorefineError(
                f"--iter {run.cfg.iterations}: nothing to run from --startiter {start} "
                "(give a larger --iter to extend the run)"
            )
        done = [h["iteration"] for h in record.get("iterations", [])]
        if start - 1 not in done:
            raise CryorefineError(
                f"--startiter {start}: iteration {start - 1} did not finish in {run.path} "
                f"(finished: {', '.join(map(str, done)) or 'none'})"
            )
        record["iterations"] = [h for h in record["iterations"] if h["iteration"] < start]
        record["options"]["iter"] = run.cfg.iterations  # may have grown
        record.pop("stopped", None)
        record.setdefault("resumed", []).append(
            {"at_iteration": start, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
        run.opts["seed"] = record["options"]["seed"]
        run.cfg = refine_config(run.opts)
        for p in run.path.iterdir():  # what a killed run was writing
            if p.name.startswith(".") and p.name.endswith(".partial"):
                p.unlink()
        return run.path, record, start, None
    if opts.get("seed") is None:
        opts["seed"] = secrets.randbelow(2**31)
        record_opts["seed"] = opts["seed"]
        run.cfg = refine_config(opts)
    created = None
    if run.path is None:
        path = created = next_refine_folder()
    else:
        path = run.path
        created = _new_folder(path)
        if created is None and ((path / PARMS).exists() or any(path.glob("threed_*"))):
            raise CryorefineError(
                f"--path {path}: holds a refinement; resume it with --startiter or choose "
                "another folder"
            )
    record = {
        "record_version": RECORD_VERSION,
        "cryorefine_version": __version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "cwd": os.getcwd(),
        "options": record_opts,
        "iterations": [],
    }
    return path, record, 0, created


def _image_names(run: Run, path: Path, resume: bool) -> np.ndarray:
    """How ``particles_NN.star`` names each particle's image: the input's MRC stacks, or
    ``particles.mrcs`` written once into the folder when RELION cannot read them."""
    names = star_image_names(run.stack)
    if names is not None:
        return names
    copy = path / "particles.mrcs"
    if not (resume and copy.is_file()):
        write_stack(run.stack, copy, overwrite=resume)
    return np.array([f"{i + 1:06d}@{ref_path(copy)}" for i in range(len(run.stack))], dtype=object)


def angular_step(cfg: RefineConfig) -> float:
    """The step (degrees) of the projections' orientations: ``delta``, or the step
    implied by ``n`` over the asymmetric unit (:func:`angular_step_deg`)."""
    return angular_step_deg(cfg.project3d.orientgen_mod, cfg.sym)


def _improved(history: list[dict]) -> bool:
    """Whether the last iteration's resolution gained at least :data:`SETTLED_GAIN`."""
    return len(history) >= 2 and history[-1]["resolution"] < history[-2]["resolution"] * (
        1 - SETTLED_GAIN
    )


def plan_search(history: list[dict], cfg: RefineConfig) -> Search:
    """The search of the iteration after ``history`` (module docstring)."""
    local = cfg.localrefine_mod
    step = angular_step(cfg)
    done = [e for e in history if e.get("search") == "local"]
    if local.mode == "global":
        return Search("global")
    if not done:
        # settled: a change between two global iterations (not from the input's poses)
        # under the step, or no gain in resolution (each iteration draws its grids
        # afresh, so their discretisation alone moves the poses by about the step)
        change = history[-1].get("median_orientation_change") if len(history) >= 2 else None
        settled = change is not None and (change < step or not _improved(history))
        if local.mode == "auto" and not settled:
            return Search("global")
        radius = local.range_deg or step
    else:
        radius = done[-1]["range_deg"]
        if history[-1].get("search") == "local" and _improved(history):
            radius = max(radius / 2, min(MIN_RANGE_DEG, radius))
    spacing = min(local.step_deg, radius) if local.step_deg else radius / 2
    return Search("local", radius, spacing, local.shift_px)


def stop_reason(history: list[dict], cfg: RefineConfig) -> str | None:
    """Why the run may stop after the last iteration of ``history`` (``None``: go on)."""
    if not cfg.earlystop or len(history) < MIN_ITERATIONS:
        return None
    last, before = history[-1], history[-2]
    res, res0 = last["resolution"], before["resolution"]
    change = last.get("median_orientation_change")
    if last.get("search") == "local":
        runs = sum(e.get("search") == "local" for e in history)
        radius = last["range_deg"]
        if runs >= 2 and not _improved(history) and change is not None and change < radius:
            return (
                f"converged: resolution {res:.2f} Å vs {res0:.2f} Å before (gain under "
                f"{100 * SETTLED_GAIN:g}%), median orientation change {change:.2f}° under the "
                f"{radius:g}° search radius"
            )
        return None
    if plan_search(history, cfg).kind == "local":
        return None  # the orientations settled: the local search takes over
    step = angular_step(cfg)
    if res >= res0 * (1 - SETTLED_GAIN) and change is not None and change < step:
        return (
            f"converged: resolution {res:.2f} Å vs {res0:.2f} Å before (gain under "
            f"{100 * SETTLED_GAIN:g}%), median orientation change {change:.2f}° under the "
            f"{step:g}° step"
        )
    return None


def _progress_factory(enabled: bool) -> Callable | None:
    if not enabled:
        return None
    from tqdm import tqdm

    def make(stage: str, half: int, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=f"{stage} half {half + 1}", unit="ptcl", leave=False)

        def update(k: int) -> None:
            bar.update(k)
            if bar.n >= total:
                bar.close()

        return update

    return make


def refine(run: Run, *, progress: bool | None = None, console: bool = True) -> dict:
    """Run the refinement; returns the parameter record (with every iteration's figures).

    ``console``: print the log's INFO lines (each iteration's summary) to standard output;
    they go to ``run.log`` and :data:`LOGGER`'s other handlers in any case.
    """
    with parallel.use(run.parallel), memory.low_memory(bool(run.opts.get("lowmem"))):
        return _refine(run, progress=progress, console=console)


def _refine(run: Run, *, progress: bool | None, console: bool) -> dict:
    path, record, start, created = _setup_folder(run)
    resume = start > 0
    cfg, opts, stack, apix = run.cfg, run.opts, run.stack, run.apix
    try:
        log = Log(path / "run.log", int(opts.get("verbose") or 0), console=console)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    gold = cfg.goldstandard
    started = False  # whether an iteration began: a folder made for a run that
    # could not start is removed, one that began keeps its log
    try:
        _write_json(path / PARMS, record)
        log(
            f"cryorefine {__version__} refine in {path} "
            f"({'resuming at iteration ' + str(start) if resume else 'new run'}): "
            f"{len(stack)} particles of {stack.box} px at {apix:g} Å/px; seed {opts['seed']}",
            echo=True,
        )
        for line in run.warnings:
            log(line, echo=True)
        rng = np.random.default_rng([int(opts["seed"]), 0xA1F])
        labels = half_sets(stack.meta, rng) if gold else np.zeros(len(stack), np.int64)
        halves = [np.flatnonzero(labels == h) for h in (1, 2)] if gold else [np.arange(len(stack))]
        if resume:
            maps = [read_map(p).data for p in outputs.map_paths(path, start - 1, gold)]
            previous_filt = read_map(
                outputs.iteration_file(path, "threed_filt", start - 1, ".mrc")
            ).data
            mask_file = outputs.iteration_file(path, "threed_mask", start - 1, ".mrc")
            automask = read_map(mask_file).data if mask_file.is_file() else None
            maps = _next_maps(maps, previous_filt, automask, cfg, apix, gold)
            prev_rot, prev_shift = read_poses_star(
                outputs.iteration_file(path, "particles", start - 1, ".star"), apix=apix
            )
        else:
            maps = start_maps(run.model, cfg, apix, rng)
            previous_filt = run.model
            known = stack.meta.has_orientation.all()
            prev_rot = stack.meta.rotations if known else None
            prev_shift = stack.meta.shift_a if known else None
        names = _image_names(run, path, resume)
        outputs.write_particle_sets(
            path, stack, names, halves, gold, run.usefilt, run.model, resume=resume
        )
        if gold and start == 0:
            for m, p in zip(maps, outputs.start_paths(path), strict=True):
                write_map(p, Map(m, apix), overwrite=resume)
        history = record["iterations"]
        bars = _progress_factory(sys.stderr.isatty() if progress is None else progress)
        group = symmetry_group(cfg.map_sym)
        for text in run.notes:
            log(f"warning: {text}")
        started = True
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            search = plan_search(history, cfg)
            commands = eman2_commands(opts, cfg, it, str(path), search)
            reuse, cm = False, None
            if resume and it == start and search.kind == "global":
                reuse, cm = _completed_matrices(path, it, halves, gold, log)

            def save(stage: str, value, n_r: int, it=it) -> None:
                outputs.write_matrices(
                    outputs.classify_paths(path, it, gold),
                    value,
                    halves,
                    n_r,
                    [{} for _ in halves],
                    overwrite=True,
                )

            try:
                if search.kind == "local":
                    step = run_local_step(
                        maps,
                        stack,
                        halves,
                        cfg,
                        iteration=it,
                        rotations=prev_rot,
                        shifts_a=prev_shift,
                        search=search,
                        fsc_curve=_last_fsc(history),
                        usefilt=run.usefilt,
                        progress=bars,
                    )
                else:
                    step = run_step(
                        maps,
                        stack,
                        halves,
                        cfg,
                        iteration=it,
                        usefilt=run.usefilt,
                        cm=cm,
                        simmx_files=outputs.simmx_paths(path, it, gold),
                        simmx_headers=_simmx_headers(path, it, gold, run.usefilt is not None),
                        reuse_simmx=reuse,
                        progress=bars,
                        save=save,
                    )
            except OptionError as err:  # a stage's own option names, as refine spells them
                raise refine_spelling(err, opts) from None
            filt, automask = filtered(step.volume, cfg, apix)
            next_maps = _next_maps(step.maps, filt, automask, cfg, apix, gold)
            if gold and cfg.mass_kda:  # what the halves project next, for EMAN2's lines
                for m, s in zip(next_maps, outputs.half_suffixes(True), strict=True):
                    write_map(
                        outputs.iteration_file(path, "threed_filt", it, ".mrc", s),
                        Map(m, apix),
                        overwrite=resume,
                    )
            figures = outputs.write_step(
                path,
                it,
                step,
                stack,
                names,
                halves,
                filt,
                automask,
                previous_filt,
                overwrite=resume,
            )
            entry = _summary(it, step, figures, prev_rot, group, apix, t0, gold)
            history.append(entry)
            _write_json(path / PARMS, record)
            for stage in step.stages:
                log(
                    f"iteration {it:02d} {stage}: {step.seconds[stage]:.1f} s; {commands[stage]}",
                    level=2,
                )
            log(summary_line(entry), echo=True)
            report.write_report(path, record, step, apix, overwrite=True)
            maps, previous_filt = next_maps, filt
            # the step's projections, class averages and maps are written: released
            # before the next iteration makes its own
            step = None
            # the poses as particles_NN.star holds them: a resumed run starts from the same
            prev_rot, prev_shift = read_poses_star(
                outputs.iteration_file(path, "particles", it, ".star"), apix=apix
            )
            why = stop_reason(history, cfg)
            if why and it < cfg.iterations - 1:
                log(f"stopped after iteration {it:02d}: {why}", echo=True)
                record["stopped"] = why
                _write_json(path / PARMS, record)
                break
        else:
            record["stopped"] = f"ran the {cfg.iterations} iterations of --iter"
            _write_json(path / PARMS, record)
        record["path"] = str(path)
        final = history[-1]
        kind = resolution_kind(gold)
        final_map = outputs.iteration_file(path, "threed", final["iteration"], ".mrc")
        log(
            f"final map {final_map}: {kind} {report.angstroms(final['resolution'])}; "
            f"report {path}/report.html",
            echo=True,
        )
        return record
    except BaseException:
        if created is not None and not started:
            log.close()
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        log.close()


def _last_fsc(history: list[dict]) -> np.ndarray | None:
    """The half maps' FSC of the last iteration: the reported (corrected) curve, else
    the unmasked one (``None`` before any iteration)."""
    if not history:
        return None
    curve = history[-1].get("fsc_corrected") or history[-1].get("fsc")
    return None if curve is None else np.asarray(curve, np.float64)


def _completed_matrices(
    path: Path, it: int, halves: list[np.ndarray], gold: bool, log: Log
) -> tuple[bool, ClassMx | None]:
    """Whether a killed run finished the similarity matrices of ``it`` (complete, as
    every output is written atomically), and its classification if it finished that."""
    cm = None
    files = outputs.simmx_paths(path, it, gold)
    done = all(f.is_file() for f in files)
    if done:
        log(f"iteration {it:02d}: reusing the complete {', '.join(f.name for f in files)}")
        found = outputs.classify_paths(path, it, gold)
        if all(f.is_file() for f in found):
            cm = outputs.read_matrices(found, halves, sum(len(h) for h in halves))
            log(f"iteration {it:02d}: reusing the complete {', '.join(f.name for f in found)}")
    return done, cm


def _simmx_headers(path: Path, it: int, gold: bool, usefilt: bool) -> list[dict]:
    """What e2simmx writes on image 0 of each half's matrix: its inputs, as its command
    line in ``run.log`` names them."""
    return [
        {
            "projection_file": str(outputs.iteration_file(path, "projections", it, ".hdf", s)),
            "particle_file": str(outputs.particle_set(path, s, usefilt=usefilt)),
        }
        for s in outputs.half_suffixes(gold)
    ]


def _next_maps(half_maps, filt, automask, cfg: RefineConfig, apix: float, gold: bool):
    """The maps the next iteration projects: each half map (mass-normalised and masked
    by ``automask`` as ``threed_filt`` when ``--mass`` is given), or the single
    chain's ``threed_filt``."""
    if not gold:
        return [filt]
    if not cfg.mass_kda:
        return list(half_maps)
    out = []
    for m in half_maps:
        f, _ = filtered(m, cfg, apix, mask=automask)
        out.append(f)
    return out


def _summary(it, step: Step, figures: dict, prev_rot, group, apix, t0, gold) -> dict:
    """One iteration's figures for ``0_refine_parms.json``, the log and the report.

    ``resolution``: the gold-standard resolution, from the masked half-map FSC corrected
    by noise substitution (``fsc_corrected``); the unmasked and masked figures beside it.
    Without half maps, make3d's split of alternate particles (not independent).
    """
    curves = step.fsc
    if gold:
        res = figures["resolution_corrected"]
        res_unmasked = figures["resolution_unmasked"]
        res_masked = figures["resolution_masked"]
    else:
        curve = step.info.get("half_fsc")
        res = (
            resolution_at(curve, threshold=0.143, apix=apix) if curve is not None else float("nan")
        )
        res_unmasked = res_masked = res
    change = histogram = None
    if prev_rot is not None:
        angles = group.angle_between(step.rotations, prev_rot)
        change = float(np.median(angles))
        histogram = np.histogram(angles, bins=report.CHANGE_BINS_DEG)[0].tolist()
    counts = {r: int(np.sum(step.reason == i)) for i, r in enumerate(REASONS)}

    def listed(curve):
        return None if curve is None else [float(x) for x in curve]

    return {
        "iteration": it,
        "resolution": float(res),
        "resolution_unmasked": float(res_unmasked),
        "resolution_masked": float(res_masked),
        "gold_standard": bool(gold),
        "median_orientation_change": change,
        "particles": counts,
        "projections": int(len(step.ref_rotations[0])) if step.ref_rotations else None,
        "search": step.search,
        "range_deg": step.range_deg,
        "orientation_change_histogram": histogram,
        "seconds": {k: round(v, 3) for k, v in step.seconds.items()},
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "successive_fsc_0.5": figures.get("successive_0.5"),
        "fsc": listed(curves.unmasked if curves else step.info.get("half_fsc")),
        "fsc_masked": listed(curves and curves.masked),
        "fsc_randomised_masked": listed(curves and curves.randomised_masked),
        "fsc_corrected": listed(curves and curves.corrected),
    }


def resolution_kind(gold: bool) -> str:
    """What the reported resolution is, for the log and the report."""
    return "half-map FSC 0.143 (masked, corrected)" if gold else "FSC 0.143 (alternate particles)"


def summary_line(e: dict) -> str:
    """The one line printed per iteration."""
    change = e["median_orientation_change"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in e["seconds"].items() if v or k == "make3d")
    used = e["particles"]["used"]
    total = sum(e["particles"].values())
    others = (
        f" (unmasked {report.angstroms(e['resolution_unmasked'])}, masked "
        f"{report.angstroms(e.get('resolution_masked', e['resolution']))})"
        if e["gold_standard"]
        else ""
    )
    search = (
        f"local search within {e['range_deg']:g}°"
        if e.get("search") == "local"
        else "global search"
    )
    return (
        f"iteration {e['iteration']:02d}: {search}; {resolution_kind(e['gold_standard'])} "
        f"{report.angstroms(e['resolution'])}{others}; median orientation change "
        f"{'-' if change is None else f'{change:.2f}°'}; {used} of {total} particles in the "
        f"map; {e['wall_seconds']:.1f} s ({stages} s)"
    )
