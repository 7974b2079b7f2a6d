"""Averagers (EMAN2 ``--averager``): many images into one per group, all groups at once.

An averager is called as ``func(images, groups, n_groups)`` with ``images``
``(k, n, n)`` float32 and ``groups`` ``(k,)`` the group (class) of each image, and
returns the ``(n_groups, n, n)`` averages and the number of images behind each
(``ptcl_repr``); a group without images gives a zero image and 0.
"""

from __future__ import annotations

import numpy as np

from cryorefine.registry import AVERAGERS


def group_sums(images: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``(n_groups, n, n)`` float64 sums of the images of each group (sorted, reduceat)."""
    images = np.asarray(images, np.float32)
    groups = np.asarray(groups, np.int64)
    out = np.zeros((n_groups,) + images.shape[1:], np.float64)
    if len(groups) == 0:
        return out
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out[g[starts]] = np.add.reduceat(images[order].astype(np.float64), starts, axis=0)
    return out


@AVERAGERS.register("mean", "Pixelwise mean of each class's images (n = 1: the image itself).")
def mean(images: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(np.asarray(groups, np.int64), minlength=n_groups)
    sums = group_sums(images, groups, n_groups)
    avg = sums / np.maximum(counts, 1)[:, None, None]
    return avg.astype(np.float32), counts
