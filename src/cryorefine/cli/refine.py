"""Refine a map against particles: e2refine's iteration, with gold-standard halves.

Each iteration projects the map over the asymmetric unit (project3d), aligns and scores
every particle against every projection (simmx), assigns each particle its best
projections (classify), averages each class and rejects its worst members
(classaverage), and reconstructs (make3d): from every kept particle with its
orientation, shift and CTF (--m3dsource particles, the default) or from the class
averages (--m3dsource classes, as e2refine). By default the particles are split into
two halves refined independently (--goldstandard 1), each from the model low-passed
to --inires with its phases randomised beyond; their FSC gives the resolution, and the
run stops early once resolution and orientations settle (--earlystop 1; --iter is the
maximum). Once the global search settles, each particle's orientation and shift are
refined locally around its last pose against its half map (--localrefine auto; 0:
global only; 1: local from the input's poses); a local iteration has no projections,
matrices or classes. Every e2refine option is accepted under its own name and default. Outputs go
to the next refine_NN folder (or --path): per iteration projections_NN, simmx_NN.hdf,
classify_NN.hdf, classes_NN (RELION .star/.mrcs and EMAN2 .hdf), threed_NN.mrc and its
half maps, FSC files, particles_NN.star (every particle's pose, for relion_reconstruct),
plus particles.lst (EMAN2's particle set; one per half), 0_refine_parms.json, run.log
(with each stage's EMAN2 command) and report.html. --check validates everything and prints
memory, disk and time estimates without refining; --startiter N --path P resumes.

examples:
  cryorefine refine --input particles.star --model start.mrc --iter 6 \\
      --classaverager ctf.weight
  cryorefine refine --input particles.star --model start.mrc --iter 6 --check
  cryorefine refine --input particles.star --model start.mrc --iter 8 --sym d2 \\
      --goldstandard 0 --m3dsource classes --twostage 2 --parallel thread:8
  cryorefine refine --input particles.star --model start.mrc --iter 6 \\
      --path refine_01 --startiter 3
"""

from __future__ import annotations

import argparse

from cryorefine import __version__
from cryorefine.refine.driver import prepare, refine
from cryorefine.refine.estimate import check_report
from cryorefine.refine.options import OPTIONS, Option, help_text

#: this subcommand defines its own -v/--verbose (an EMAN2 level, not a flag)
OWN_VERBOSE = True


def add_args(parser: argparse.ArgumentParser) -> None:
    groups = {}
    for o in OPTIONS:
        g = groups.setdefault(o.group, parser.add_argument_group(f"{o.group} options"))
        text = (help_text(o) + _shown_default(o)).replace("%", "%%")
        if o.type is bool:
            g.add_argument(f"--{o.name}", action="store_true", help=text)
        else:
            names = [f"--{o.name}"] + (["-P"] if o.name == "parallel" else [])
            g.add_argument(*names, type=o.type, default=o.default, help=text)
    parser.add_argument(
        "-c", "--check", action="store_true", help="check inputs and options, estimate, exit"
    )
    parser.add_argument(
        "-v", "--verbose", type=int, default=0, help="verbosity (EMAN2 levels; 1+: tracebacks)"
    )
    parser.add_argument("--ppid", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    parser.add_argument("positional", nargs="*", help=argparse.SUPPRESS)


def _shown_default(o: Option) -> str:
    """`` (default X)`` for the help text: every default but ``None`` and a flag's,
    zeros included."""
    if o.default is None or o.type is bool or o.name == "iter":
        return ""
    return f" (default {o.default:g})" if o.type is float else f" (default {o.default})"


def main(args: argparse.Namespace) -> int:
    opts = {o.name: getattr(args, o.name) for o in OPTIONS}
    opts["verbose"] = args.verbose
    run = prepare(opts)
    try:
        if args.check:
            for line in run.warnings:
                print(line)
            print(check_report(run))
            return 0
        refine(run)
    finally:
        run.close()
    return 0
