"""``report.html``: one self-contained page (PNG plots embedded), refreshed every iteration.

It shows the resolution and the search (global, or local and its radius) per
iteration, the half-map FSC curves, central slices and projections of the map, the
particles' orientations over the asymmetric unit, each iteration's histogram of
orientation changes, the particles kept and rejected per stage, and the time per stage.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from cryorefine.fourier.fsc import shell_frequencies_a
from cryorefine.geometry.euler import matrices_to_relion
from cryorefine.io.atomic import atomic_output
from cryorefine.refine.step import REASONS, STAGES, Step

#: bin edges (degrees) of each iteration's histogram of orientation changes
CHANGE_BINS_DEG = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 180.0)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported when first needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    plt = _pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=90, squeeze=False)
    return plt, fig, axes[0]


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def angstroms(value: float, unit: str = " Å") -> str:
    """A reported resolution: ``12.34 Å``, or that none was measured (without half maps,
    make3d splits its images only from :data:`~cryorefine.stages.make3d.MIN_WIENER_IMAGES`
    up, and only for the Wiener term)."""
    return f"{value:.2f}{unit}" if np.isfinite(value) else "not measured (make3d split no halves)"


def _resolution_plot(history: list[dict]) -> str:
    plt, fig, (ax,) = _figure()
    its = [h["iteration"] for h in history]
    ax.plot(its, [h["resolution"] for h in history], "o-", color="k", label="masked, corrected")
    if all("resolution_masked" in h for h in history):
        masked = [h["resolution_masked"] for h in history]
        ax.plot(its, masked, "^:", color="tab:red", label="masked")
    ax.plot(its, [h["resolution_unmasked"] for h in history], "s--", color="grey", label="unmasked")
    ax.set_xlabel("iteration")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("FSC 0.143 resolution (Å)")
    ax.legend(fontsize=8)
    return _png(plt, fig)


#: the half-map curves of the last iteration: record key, label, style
_LAST_CURVES = (
    ("fsc_corrected", "masked, corrected (reported)", dict(color="k", lw=1.8)),
    ("fsc_masked", "masked", dict(color="tab:red", lw=1, ls="--")),
    ("fsc", "unmasked", dict(color="tab:blue", lw=1, ls=":")),
    ("fsc_randomised_masked", "phase-randomised, masked", dict(color="tab:green", lw=1)),
)


def _fsc_plot(history: list[dict], apix: float) -> str:
    """Earlier iterations' reported curves in grey; the last one's four curves."""
    plt, fig, (ax,) = _figure()
    for h in history[:-1]:
        curve = h.get("fsc_corrected") or h.get("fsc_masked") or h.get("fsc")
        if curve is not None:
            freq = shell_frequencies_a(2 * (len(curve) - 1), apix)
            ax.plot(freq[1:], curve[1:], color="0.75", lw=0.8)
    last = history[-1]
    for key, label, style in _LAST_CURVES:
        curve = last.get(key)
        if curve is not None:
            freq = shell_frequencies_a(2 * (len(curve) - 1), apix)
            label = f"{label}, iteration {last['iteration']:02d}"
            ax.plot(freq[1:], curve[1:], label=label, **style)
    for t in (0.143, 0.5):
        ax.axhline(t, color="grey", ls="--", lw=0.7)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("half-map FSC")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)
    return _png(plt, fig)


def _map_views(volume: np.ndarray) -> str:
    plt = _pyplot()
    n = volume.shape[-1]
    fig, grid = plt.subplots(2, 3, figsize=(9, 6.2), dpi=90)
    for k, name in enumerate("zyx"):
        grid[0, k].imshow(np.take(volume, n // 2, axis=k), cmap="gray", origin="lower")
        grid[0, k].set_title(f"central slice ⊥ {name}", fontsize=9)
        grid[1, k].imshow(volume.sum(axis=k), cmap="gray", origin="lower")
        grid[1, k].set_title(f"projection along {name}", fontsize=9)
    for ax in grid.ravel():
        ax.set_axis_off()
    return _png(plt, fig)


def _angles_plot(step: Step) -> str:
    plt, fig, (ax,) = _figure(6, 3.6)
    rot, tilt, _ = matrices_to_relion(step.rotations)
    used = step.reason == 0
    hb = ax.hexbin(rot[used], tilt[used], gridsize=36, cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="particles")
    ax.set_xlabel("rot (°)")
    ax.set_ylabel("tilt (°)")
    ax.set_title("orientations of the particles in the map", fontsize=9)
    return _png(plt, fig)


def _stacked(history: list[dict], key: str, names: tuple[str, ...], ylabel: str) -> str:
    plt, fig, (ax,) = _figure()
    its = np.array([h["iteration"] for h in history])
    bottom = np.zeros(len(its))
    for name in names:
        v = np.array([h[key].get(name, 0) for h in history], dtype=float)
        ax.bar(its, v, bottom=bottom, label=name)
        bottom += v
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _search(h: dict) -> str:
    """An iteration's search, for the table: global, or local and its radius."""
    if h.get("search") == "local":
        return f"local, {h['range_deg']:g}°"
    return "global"


def _change_plot(history: list[dict]) -> str:
    """Each iteration's histogram of orientation changes (from the iteration before),
    over :data:`CHANGE_BINS_DEG`, labelled with its search."""
    plt, fig, (ax,) = _figure()
    edges = np.asarray(CHANGE_BINS_DEG)
    x = np.arange(len(edges) - 1)
    shown = [h for h in history if h.get("orientation_change_histogram")]
    width = 0.8 / max(len(shown), 1)
    for i, h in enumerate(shown):
        counts = np.asarray(h["orientation_change_histogram"], float)
        label = f"{h['iteration']:02d} ({_search(h)})"
        ax.bar(x + i * width, counts / max(counts.sum(), 1), width, label=label)
    ax.set_xticks(x + 0.4, [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("orientation change from the iteration before (°)")
    ax.set_ylabel("fraction of particles")
    if shown:
        ax.legend(fontsize=7)
    return _png(plt, fig)


def report_html(record: dict, step: Step, apix: float) -> str:
    """The page's HTML for the run ``record`` whose last iteration is ``step``."""
    history = record["iterations"]
    last = history[-1]
    rows = []
    for h in history:
        change = h["median_orientation_change"]
        p = h["particles"]
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{c}</td>"
                for c in (
                    f"{h['iteration']:02d}",
                    _search(h),
                    angstroms(h["resolution"], ""),
                    angstroms(h.get("resolution_masked", h["resolution"]), ""),
                    angstroms(h["resolution_unmasked"], ""),
                    "-" if change is None else f"{change:.2f}",
                    p["used"],
                    p["classkeep"],
                    p["m3dkeep"],
                    *(f"{h['seconds'].get(s, 0.0):.1f}" for s in STAGES),
                    f"{h['wall_seconds']:.1f}",
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{c}</th>"
        for c in (
            "iteration",
            "search",
            "FSC 0.143, masked and corrected (Å)",
            "masked (Å)",
            "unmasked (Å)",
            "median orientation change (°)",
            "in map",
            "rejected: classkeep",
            "rejected: m3dkeep",
            *(f"{s} (s)" for s in STAGES),
            "wall (s)",
        )
    )
    img = '<img src="data:image/png;base64,{}">'.format
    options = html.escape(
        " ".join(
            f"--{k}={v}" for k, v in sorted(record["options"].items()) if v not in (None, False)
        )
    )
    kind = "half-map (gold standard)" if last["gold_standard"] else "alternate-particle"
    corrected = (
        "masked, corrected by noise substitution; masked "
        f"{angstroms(last.get('resolution_masked', last['resolution']))}, "
        if last["gold_standard"]
        else ""
    )
    stopped = html.escape(record.get("stopped", "running"))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>cryorefine refine report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px}}
img{{max-width:100%}}</style></head><body>
<h1>cryorefine refine</h1>
<p>cryorefine {html.escape(str(record.get("cryorefine_version")))}, started
{html.escape(record.get("started", ""))}; {stopped}.</p>
<p><b>Iteration {last["iteration"]:02d}: {kind} FSC 0.143 {angstroms(last["resolution"])}</b>
({corrected}unmasked {angstroms(last["resolution_unmasked"])}; {apix:g} Å/px, Nyquist
{2 * apix:.2f} Å).</p>
<h2>Iterations</h2><table><tr>{head}</tr>{"".join(rows)}</table>
<h2>Resolution</h2>{img(_resolution_plot(history))}
<h2>FSC curves</h2>{img(_fsc_plot(history, apix))}
<h2>Map (iteration {last["iteration"]:02d})</h2>{img(_map_views(step.volume))}
<h2>Angular distribution</h2>{img(_angles_plot(step))}
<h2>Orientation change per iteration</h2>{img(_change_plot(history))}
<h2>Particles per iteration</h2>{img(_stacked(history, "particles", REASONS, "particles"))}
<h2>Time per stage</h2>{img(_stacked(history, "seconds", STAGES, "seconds"))}
<h2>Options</h2><p style="font-family:monospace;font-size:11px">{options}</p>
</body></html>
"""


def write_report(path: Path, record: dict, step: Step, apix: float, *, overwrite: bool) -> None:
    """Write ``path / report.html`` atomically."""
    text = report_html(record, step, apix)
    with atomic_output(path / "report.html", overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
