"""The ``cryorefine`` command line: one module per subcommand, listed explicitly.

Each subcommand module has a docstring (first line: description; the rest, with
worked examples, the ``--help`` epilog), ``add_args(parser)`` and ``main(args)``.
A :class:`CryorefineError` prints one line and exits with status 2 (with the traceback
under ``--verbose``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from types import ModuleType

from cryorefine import __version__
from cryorefine.errors import CryorefineError


def _subcommands() -> dict[str, ModuleType]:
    from cryorefine.cli import (
        check,
        classaverage,
        classify,
        convert,
        ctf,
        demo,
        fsc,
        help,
        make3d,
        process,
        project3d,
        refine,
        simmx,
        simulate,
    )

    return {
        "convert": convert,
        "process": process,
        "ctf": ctf,
        "check": check,
        "project3d": project3d,
        "simulate": simulate,
        "simmx": simmx,
        "classify": classify,
        "classaverage": classaverage,
        "make3d": make3d,
        "refine": refine,
        "fsc": fsc,
        "help": help,
        "demo": demo,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryorefine",
        description="Single-particle cryo-EM 3D refinement (EMAN2 e2refine re-implemented).",
    )
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _subcommands().items():
        doc = (module.__doc__ or "").strip()
        first, _, rest = doc.partition("\n")
        p = sub.add_parser(
            name,
            help=first,
            description=first,
            epilog=rest.strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if not getattr(module, "OWN_VERBOSE", False):
            p.add_argument(
                "-v", "--verbose", action="store_true", help="show tracebacks and more detail"
            )
        module.add_args(p)
        if getattr(module, "PARALLEL", False):
            p.add_argument(
                "-P",
                "--parallel",
                metavar="SPEC",
                help="where the chunks run: thread:N (N cores; default all), dask:local=N "
                "(N worker processes), dask:scheduler=ADDRESS, "
                "dask:jobqueue=slurm:cores=C:memory=M:jobs=J",
            )
        p.set_defaults(_main=module.main, _parallel_stage=getattr(module, "PARALLEL", False))
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cryorefine: warning: {message}", file=sys.stderr)


def set_thread_spin() -> None:
    """Let OpenMP threads spin a tenth of libgomp's default before they sleep.

    The compiled kernels' OpenMP (libgomp) threads would otherwise spin for up to
    ~300,000 rounds after each parallel region, taking the cores from scipy.fft's
    threads that run between the kernels (10-20% of a simmx run with an FFT
    comparator); a tenth of that still keeps them awake between the short kernels of a
    single-pair alignment. Set by the command line (and the benchmarks) before numba
    starts its threads, never on import, so a host program's threads are its own; a
    setting the user gives wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input or options)."""
    set_thread_spin()
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if getattr(args, "_parallel_stage", False):
            from cryorefine import parallel

            with parallel.use(args.parallel):
                return int(args._main(args) or 0)
        return int(args._main(args) or 0)
    except CryorefineError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"cryorefine: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
