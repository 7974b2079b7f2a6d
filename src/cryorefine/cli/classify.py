"""Assign each particle to its best projection(s) of a similarity matrix (e2classify).

Output as e2classify writes it: an EMAN2 .hdf stack of 7 images of sep columns by
particles rows (class, weight, dx, dy, dalpha, flip, scale), best choice first. Reads
a matrix from cryorefine simmx or e2simmx.py (and the .h5 files of cryorefine 0.1).

examples:
  cryorefine classify simmx.hdf classify.hdf
  cryorefine classify simmx.hdf classify.hdf --sep 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import ClassifyConfig
from cryorefine.stages.classify import run_classify


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("simmx", type=Path, help="similarity matrix (from simmx or e2simmx.py)")
    parser.add_argument("output", type=Path, help="classification matrix (.hdf)")
    add_config_arguments(parser, ClassifyConfig)
    parser.add_argument("--overwrite", "-f", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ClassifyConfig, args)
    cm = run_classify(args.simmx, args.output, cfg, overwrite=args.overwrite)
    used = len(np.unique(cm.cls[:, 0]))
    print(f"wrote {args.output}: {cm.cls.shape[0]} particles into {used} classes")
    return 0
