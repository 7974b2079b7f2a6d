"""Assign each particle to its best projection(s) of a similarity matrix (e2classify).

Output (HDF5): datasets cls, weight, dx, dy, dalpha, flip, scale of shape
(particles, sep), best first, and members/offsets + members/particles listing the
particles of each class.

examples:
  cryorefine classify simmx.h5 classmx.h5
  cryorefine classify simmx.h5 classmx.h5 --sep 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import ClassifyConfig
from cryorefine.stages.classify import run_classify


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("simmx", type=Path, help="similarity matrix from cryorefine simmx")
    parser.add_argument("output", type=Path, help="classification matrix (.h5)")
    add_config_arguments(parser, ClassifyConfig)
    parser.add_argument("--overwrite", "-f", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ClassifyConfig, args)
    cm = run_classify(args.simmx, args.output, cfg, overwrite=args.overwrite)
    used = len(np.unique(cm.cls[:, 0]))
    print(f"wrote {args.output}: {cm.cls.shape[0]} particles into {used} classes")
    return 0
