"""Check a particle stack (and a starting map) before a run, and summarise them.

Reads every image once (streamed) to find unreadable files and NaN/Inf values;
checks that images are square, that the map is cubic, that the map's box and pixel
size match the particles', and that the metadata a later step needs is present.
Exits with status 2 and a one-line message at the first problem.

examples:
  cryorefine check --input particles.star --model start.mrc
  cryorefine check --input sets/all.lst --require ctf,orientations
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import ParticleStack

REQUIREMENTS = ("ctf", "orientations")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="particle stack")
    parser.add_argument("--model", type=Path, help="starting 3D map")
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the files'")
    parser.add_argument(
        "--require",
        default="",
        help=f"comma list of metadata that must be present: {', '.join(REQUIREMENTS)}",
    )
    parser.add_argument("--chunk", type=int, default=1024, help="particles per chunk")


def check_compatible(stack: ParticleStack, model_path: Path, *, apix: float | None) -> None:
    """Raise unless the map is cubic with the particles' box and pixel size (1 %)."""
    volume = read_map(model_path, apix=apix)
    if volume.box != stack.box:
        raise CryorefineError(
            f"{model_path}: map box {volume.box} px differs from the "
            f"particles' {stack.box} px ({stack.label})"
        )
    if volume.apix > 0 and abs(volume.apix - stack.apix) > 0.01 * stack.apix:
        raise CryorefineError(
            f"{model_path}: map pixel size {volume.apix:.4f} Å differs from "
            f"the particles' {stack.apix:.4f} Å ({stack.label})"
        )


def check_requirements(stack: ParticleStack, requirements: list[str]) -> None:
    for req in requirements:
        if req not in REQUIREMENTS:
            raise CryorefineError(
                f"--require: unknown item '{req}'; valid: {', '.join(REQUIREMENTS)}"
            )
        if req == "ctf" and not stack.meta.ctf.known.all():
            raise CryorefineError(
                f"{stack.label}: no CTF parameters (STAR: rlnDefocusU, "
                "rlnDefocusV, rlnDefocusAngle, rlnVoltage, "
                "rlnSphericalAberration; EMAN2: ctf)"
            )
        if req == "orientations" and not stack.meta.has_orientation.all():
            raise CryorefineError(
                f"{stack.label}: no particle orientations (STAR: "
                "rlnAngleRot, rlnAngleTilt, rlnAnglePsi; EMAN2: "
                "xform.projection)"
            )


def main(args: argparse.Namespace) -> int:
    stack = ParticleStack.from_path(args.input, apix=args.apix)
    try:
        check_requirements(stack, [r for r in args.require.split(",") if r])
        if args.model is not None:
            check_compatible(stack, args.model, apix=args.apix)
        for _ in stack.chunks(args.chunk):
            pass  # read() raises on NaN/Inf and unreadable data
        meta = stack.meta
        files = len(np.unique(meta.source_path.astype(str)))
        print(
            f"{stack.label}: {len(stack)} particles of {stack.box} px at "
            f"{stack.apix:.4f} Å/px in {files} file(s); CTF: "
            f"{'yes' if meta.ctf.known.all() else 'no'}; orientations: "
            f"{'yes' if meta.has_orientation.all() else 'no'}; half sets: "
            f"{'yes' if (meta.half_set > 0).all() else 'no'}"
        )
        if args.model is not None:
            print(f"{args.model}: matches the particles")
    finally:
        stack.close()
    return 0
