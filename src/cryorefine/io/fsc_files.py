"""FSC curves on disk: EMAN2's two-column text, RELION's STAR table, and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryorefine.fourier.fsc import resolution_at, shell_frequencies_a
from cryorefine.io.atomic import atomic_output


def write_fsc_text(path: Path, curve: np.ndarray, *, apix: float, overwrite: bool = False) -> None:
    """EMAN2's two-column file: one line per shell 1..n/2, ``freq (1/Å)\\tFSC`` as ``%g``."""
    n = 2 * (len(curve) - 1)
    freq = shell_frequencies_a(n, apix)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text("".join(f"{f:g}\t{c:g}\n" for f, c in zip(freq[1:], curve[1:], strict=True)))


def write_fsc_star(
    path: Path,
    curve: np.ndarray,
    *,
    apix: float,
    overwrite: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    general: dict[str, float] | None = None,
) -> None:
    """RELION-style ``data_fsc`` table and ``data_general`` with the 0.143 resolution of
    ``curve``; ``extra``: more FSC columns by RELION label (e.g. the masked and
    unmasked maps' curves); ``general``: more ``data_general`` values by label."""
    n = 2 * (len(curve) - 1)
    freq = shell_frequencies_a(n, apix)
    with np.errstate(divide="ignore"):
        ang = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), 999.0)
    table = pd.DataFrame(
        {
            "rlnSpectralIndex": np.arange(len(curve)),
            "rlnResolution": freq,
            "rlnAngstromResolution": ang,
            "rlnFourierShellCorrelation": curve,
            **(extra or {}),
        }
    )
    block = {"rlnFinalResolution": resolution_at(curve, threshold=0.143, apix=apix)}
    block.update(general or {})
    # data_fsc first: relion_reconstruct --fsc reads the first block
    text = starfile.to_string({"fsc": table, "general": block}, float_format="%.6f", sep=" ")
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)


def plot_fsc(
    path: Path, curve: np.ndarray, *, apix: float, overwrite: bool = False, title: str = ""
) -> None:
    """A PNG of the curve against spatial frequency, with the 0.143 and 0.5 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 * (len(curve) - 1)
    freq = shell_frequencies_a(n, apix)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(freq[1:], curve[1:], color="k", lw=1.5)
    for t, style in ((0.143, "--"), (0.5, ":")):
        res = resolution_at(curve, threshold=t, apix=apix)
        ax.axhline(t, color="grey", ls=style, lw=1)
        ax.text(freq[-1], t + 0.02, f"{t}: {res:.2f} Å", ha="right", fontsize=8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
