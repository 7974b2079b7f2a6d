"""e2simmx: every particle against every reference projection, aligned and scored.

The result holds, per particle (row) and projection (column), the final score
(smaller is better) and the transform that brings the **particle** onto the
projection (the inverse of the aligner's projection -> particle transform):
``dx, dy`` in full-size pixels, ``dalpha`` in degrees ``[0, 360)``, ``flip`` 0/1 and
``scale`` (1). Particles are processed in chunks; references once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft

from cryorefine import memory, parallel
from cryorefine.align import transform2d
from cryorefine.align.bank import release_pool
from cryorefine.align.compare import load_mask, pair_context
from cryorefine.align.engine import EngineAligner, Reuse, align_pairs
from cryorefine.align.rotational import footprints, spectra
from cryorefine.align.transform2d import Transform2D
from cryorefine.config import SimmxConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import fft_threads, ring_mean
from cryorefine.fourier.filters import match_power_spectrum, radial_power
from cryorefine.io.atomic import check_output
from cryorefine.io.eman2 import HdfMatrixWriter, MatrixFile
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.twostage import N_BEST, twostage_pairs

#: the score of a cell that was not computed (or of a blank projection)
WORST = 1e24
#: an uncomputed cell of a two-stage row scores this much worse than the row's worst
#: computed one (e2simmx2stage)
UNCOMPUTED_MARGIN = 1e-4
#: aligners that run on the batched engine
ENGINE = {"rotate_translate_flip", "rotate_translate"}
FIELDS = ("score", "dx", "dy", "dalpha", "flip", "scale")
#: pairs scored per call when there is no aligner, and per batch of a per-pair aligner
PAIR_BATCH = 4096
PAIRWISE_BATCH = 2048
#: smallest box for which the rotational footprints of the references are precomputed
MIN_FOOTPRINT_BOX = 16


@dataclass
class Simmx:
    """Per (particle, projection) arrays ``(Np, Nc)``: score and particle->projection
    alignment (see the module docstring)."""

    score: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    dalpha: np.ndarray
    flip: np.ndarray
    scale: np.ndarray
    attrs: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, n_p: int, nc: int) -> Simmx:
        z = lambda: np.zeros((n_p, nc), np.float32)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), np.ones((n_p, nc), np.float32))


def signal_power(refs: np.ndarray) -> np.ndarray:
    """The references' mean power per Fourier ring ``(n // 2,)``, scaled to a maximum of
    1 over rings 1 and up: the shape of the signal's spectrum for :func:`ctf_snr`."""
    box = refs.shape[-1]
    total = np.zeros(box // 2)
    for s0 in range(0, len(refs), 256):
        ft = scipy.fft.rfft2(refs[s0 : s0 + 256].astype(np.float32), workers=fft_threads())
        total += ring_mean(ft.real**2 + ft.imag**2)[:, : box // 2].sum(axis=0)
    peak = total[1:].max() if box >= 4 else 0.0
    return total / peak if peak > 0 else np.ones(box // 2)


def map_signal_power(volume: np.ndarray) -> np.ndarray:
    """:func:`signal_power` from a map ``(n, n, n)``: its mean power per Fourier shell,
    which its projections have on average per ring (projection-slice theorem)."""
    n = volume.shape[-1]
    total = radial_power(volume, 3)[: n // 2]
    peak = total[1:].max() if n >= 4 else 0.0
    return total / peak if peak > 0 else np.ones(n // 2)


def ctf_snr(
    meta: ParticleMetadata,
    idx: np.ndarray,
    box: int,
    apix: float,
    signal: np.ndarray | None = None,
) -> np.ndarray | None:
    """Per-particle SNR per Fourier ring ``(len(idx), box // 2)`` for ``snrweight``;
    None when a particle has no CTF. ``apix``: the pixel size of the (possibly shrunk)
    images of ``box`` px.

    A particle with EMAN2's measured curve (``ctf.snr`` from e2ctf, sampled every
    ``dsbg`` 1/Å) gets it linearly interpolated at ring ``i``'s frequency
    ``i / (apix box)``, its last value beyond its end. Choice, for the others
    (RELION-style particles carry CTF parameters but no SNR curve): with white noise
    the SNR of ring ``s`` is proportional to ``CTF^2(s) P(s)``, ``P`` the power spectrum
    of the noise-free particle, which the projections of the current map provide
    (``signal``, from :func:`signal_power`; 1 if not given). ``frc`` and ``phase`` use
    the curve as relative weights, so the unknown factor drops out.
    """
    ctf = meta.ctf.take(idx)
    if not ctf.known.all():
        return None
    c2 = ctf.evaluate(box, apix).astype(np.float64) ** 2
    snr = ring_mean(c2)[:, : box // 2]
    if signal is not None:
        snr *= signal[None, : box // 2]
    # rings without signal (a hard low-pass of the map) stay just above 0: the
    # comparators raise values <= 0 to 0.001, more than the weakest rings with signal
    snr = np.maximum(snr, 1e-12)
    curves = meta.ctf_curves
    if curves is not None:
        s = np.arange(box // 2) / (apix * box)  # 1/Å
        for row, j in enumerate(np.asarray(idx)):
            if curves[j] is not None:
                dsbg, _, measured = curves[j]
                grid = dsbg * np.arange(len(measured))
                snr[row] = np.interp(s, grid, np.asarray(measured, np.float64))
    return snr


def runs_on_engine(align) -> bool:
    """Whether an aligner modifier runs on the batched engine (rotate_translate[_flip];
    not ``rotate_translate:nozero=1``)."""
    return align.name in ENGINE and not (
        align.name == "rotate_translate" and align.params["nozero"]
    )


def _masked(cmp, mask: np.ndarray):
    def masked_cmp(a, b, **ctx):
        return cmp(a * mask, b * mask, **ctx)

    return masked_cmp


def score_pairs(
    refs: np.ndarray,
    particles: np.ndarray,
    cfg: SimmxConfig,
    *,
    apix: float,
    snr: np.ndarray | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    ref_spectra: np.ndarray | None = None,
) -> Simmx:
    """Similarity of one chunk: ``particles`` ``(Np, n, n)`` against ``refs`` ``(Nc, n, n)``.

    Images are already shrunk if asked (``apix`` is then the shrunken pixel size);
    shifts are returned in the pixels given. ``pairs`` = ``(p_idx, c_idx)`` restricts
    the computation to those cells (the others get ``WORST``). ``snr`` ``(Np, n//2)``
    feeds ``snrweight``. :func:`simmx` does the whole job (shrink, two stages, chunks).
    """
    align, aligncmp = cfg.align_mod, cfg.aligncmp_mod
    ralign, raligncmp = cfg.ralign_mod, cfg.raligncmp_mod
    n_p, nc, n = len(particles), len(refs), refs.shape[-1]
    with cfg.naming("mask") as flag:
        mask = load_mask(cfg.mask_image, n, flag)
    final = cfg.cmp_mod if mask is None else _masked(cfg.cmp_mod, mask.astype(np.float32))
    ctx = {"apix": apix, "snr": snr}
    if pairs is None:
        p_idx, c_idx = (a.ravel() for a in np.indices((n_p, nc)))
    else:
        p_idx, c_idx = (np.asarray(a, np.int64) for a in pairs)
    out = Simmx.empty(n_p, nc)
    out.score[:] = WORST
    blank = refs.reshape(nc, -1).std(axis=1) == 0
    if align is None:
        score = np.empty(len(p_idx))
        for s0 in range(0, len(p_idx), PAIR_BATCH):
            sl = slice(s0, s0 + PAIR_BATCH)
            sub = pair_context(ctx, p_idx[sl])
            score[sl] = final(particles[p_idx[sl]], refs[c_idx[sl]], **sub)
        out.score[p_idx, c_idx] = score
        out.score[:, blank] = WORST
        return _finite(out)
    if runs_on_engine(align) and not cfg.prefilt:
        pa = align_pairs(
            refs,
            particles,
            p_idx,
            c_idx,
            EngineAligner.from_modifier(align, aligncmp),
            final=None if ralign is not None else final,
            ctx=ctx,
            reuse=Reuse(ref_spectra=ref_spectra),
        )
        fwd = pa.transform
        score = pa.final
    else:
        fwd, score = _pairwise(
            align, aligncmp, refs, particles, p_idx, c_idx, ctx, final, prefilt=cfg.prefilt
        )
    if ralign is not None:
        fwd, score = _pairwise(
            ralign,
            raligncmp,
            refs,
            particles,
            p_idx,
            c_idx,
            ctx,
            final,
            start=fwd,
            prefilt=cfg.prefilt,
        )
    back = fwd.inverse()
    out.score[p_idx, c_idx] = score
    out.dx[p_idx, c_idx], out.dy[p_idx, c_idx] = back.tx, back.ty
    out.dalpha[p_idx, c_idx], out.flip[p_idx, c_idx] = back.alpha, back.mirror
    out.score[:, blank] = WORST
    return _finite(out)


def simmx(
    refs: np.ndarray,
    particles: np.ndarray | ParticleStack,
    cfg: SimmxConfig,
    *,
    apix: float | None = None,
    meta: ParticleMetadata | None = None,
    exclude: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Simmx:
    """The similarity matrix of every particle against every projection (e2simmx).

    ``refs`` ``(Nc, n, n)`` projections; ``particles`` ``(Np, n, n)`` images (with
    ``apix`` in Å/px and, for ``snrweight``, ``meta`` holding their CTF) or a
    :class:`ParticleStack`, read chunk by chunk so that memory stays bounded
    (``cfg.chunk`` particles, default :func:`particle_chunk`). ``cfg.shrink``
    block-averages both; ``cfg.twostage`` runs e2simmx2stage's coarse search and fills
    the uncomputed cells of each row with ``max(row) + 1e-4``. ``exclude``: particle
    rows to skip (their cells get ``WORST``). ``progress(k)`` is called after each
    chunk of ``k`` particles.

    Returns the full-size result: shifts in the particles' pixels, as
    ``cryorefine simmx`` writes it. :func:`simmx_rows` gives the same rows chunk by
    chunk, never the whole matrix.
    """
    stack = ParticleStack.from_input(particles, apix=apix, meta=meta, who="simmx")
    result = Simmx.empty(len(stack), len(refs))
    result.score[:] = WORST
    for idx, part in simmx_rows(refs, stack, cfg, exclude=exclude, progress=progress):
        for name in FIELDS:
            getattr(result, name)[idx] = getattr(part, name)
    result.attrs = {"apix": stack.apix, "options": repr(cfg)}
    return result


def simmx_rows(
    refs: np.ndarray,
    stack: ParticleStack,
    cfg: SimmxConfig,
    *,
    exclude: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, Simmx]]:
    """:func:`simmx` chunk by chunk: yields ``(rows, part)``, the particle rows (in
    increasing order) and their full-size rows of the matrix. The rows of ``exclude``
    are never yielded (they are ``WORST`` throughout). The chunks run where
    :mod:`cryorefine.parallel` says and come back in order."""
    refs = np.asarray(refs, np.float32)
    if refs.shape[-1] != stack.box:
        raise CryorefineError(
            f"{stack.label}: box {stack.box} px differs from the projections ({refs.shape[-1]} px)"
        )
    apix = stack.apix
    shrink = cfg.shrink or 1
    if shrink > 1:
        refs = transform2d.meanshrink(refs, shrink)
    box = refs.shape[-1]
    n_p, nc = len(stack), len(refs)
    skip = np.zeros(n_p, bool)
    if exclude is not None:
        skip[np.asarray(exclude, np.int64)] = True
    ref_spec = spectra(footprints(refs)) if box >= MIN_FOOTPRINT_BOX else None
    signal = signal_power(refs) if cfg.needs_snr else None
    plan = twostage_pairs(refs, cfg, apix * shrink, score_pairs) if cfg.twostage else None
    chunk = cfg.chunk
    if chunk is None:
        cells = nc
        if plan is not None:  # at most the members of the N_BEST largest centres
            sizes = sorted((len(m) for m in plan.members), reverse=True)
            cells = min(nc, sum(sizes[:N_BEST]))
        chunk = parallel.chunk_size(n_p, particle_chunk(box, cells))
    shared = _ChunkContext(refs, cfg, apix, shrink, ref_spec, signal, plan)
    chunks = [c[~skip[c]] for c in np.array_split(np.arange(n_p), max(1, -(-n_p // chunk)))]
    chunks = [c for c in chunks if c.size]
    parts = parallel.map_chunks(score_chunk, shared, (stack.take(c) for c in chunks))
    try:
        for idx, part in zip(chunks, parts, strict=True):
            part.dx *= shrink
            part.dy *= shrink
            if plan is not None:
                fill_uncomputed(part)
            if progress:
                progress(len(idx))
            yield idx, part
    finally:
        release_pool()


@dataclass(frozen=True)
class _ChunkContext:
    """What every chunk of :func:`simmx` needs besides its particles: the (shrunk)
    projections, the configuration, the pixel size (Å/px, unshrunk), the shrink, the
    projections' rotational spectra, the signal's ring power and the two-stage plan."""

    refs: np.ndarray
    cfg: SimmxConfig
    apix: float
    shrink: int
    ref_spec: np.ndarray | None
    signal: np.ndarray | None
    plan: Callable | None


def score_chunk(ctx: _ChunkContext, chunk: ParticleStack) -> Simmx:
    """One chunk of :func:`simmx`: its particles' rows, shifts in shrunk pixels."""
    images = chunk.read()
    chunk.release()
    if ctx.shrink > 1:
        images = transform2d.meanshrink(images, ctx.shrink)
    box, apix = images.shape[-1], ctx.apix * ctx.shrink
    every = np.arange(len(chunk))
    snr = ctf_snr(chunk.meta, every, box, apix, ctx.signal) if ctx.cfg.needs_snr else None
    pairs = None if ctx.plan is None else ctx.plan(images, snr)
    return score_pairs(
        ctx.refs, images, ctx.cfg, apix=apix, snr=snr, pairs=pairs, ref_spectra=ctx.ref_spec
    )


def _finite(out: Simmx) -> Simmx:
    out.score[~np.isfinite(out.score)] = WORST
    return out


def _pairwise(
    aligner,
    aligncmp,
    refs,
    particles,
    p_idx,
    c_idx,
    ctx,
    final,
    start: Transform2D | None = None,
    prefilt=False,
) -> tuple[Transform2D, np.ndarray]:
    """Any registered aligner on explicit pairs, in batches; then the final score.

    ``prefilt``: each projection is first filtered to its particle's power spectrum
    (``filter.matchto``, one filter per pair, so not on the batched engine)."""
    fwd = Transform2D.identity(len(p_idx))
    score = np.empty(len(p_idx))
    for s0 in range(0, len(p_idx), PAIRWISE_BATCH):
        sl = slice(s0, s0 + PAIRWISE_BATCH)
        kw = {k: v for k, v in aligner.params.items() if v is not None}
        sub = pair_context(ctx, p_idx[sl])
        if start is not None:
            kw["start"] = start.take(sl)
        moving = refs[c_idx[sl]]
        if prefilt:
            moving = match_power_spectrum(moving, particles[p_idx[sl]])
        res = aligner.entry.func(moving, particles[p_idx[sl]], cmp=aligncmp, **kw, **sub)
        fwd.alpha[sl], fwd.tx[sl] = res.alpha, res.tx
        fwd.ty[sl], fwd.mirror[sl] = res.ty, res.mirror
        score[sl] = final(particles[p_idx[sl]], res.images, **sub)
    return fwd, score


def run_simmx(
    projections: Path,
    particles: Path,
    output: Path,
    cfg: SimmxConfig,
    *,
    exclude: Path | None = None,
    usefilt: Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Read both stacks, compute the similarity matrix (:func:`simmx_rows`) and write
    it row chunk by row chunk; returns its shape ``(particles, projections)``.

    ``usefilt``: align and score this stack instead (the same particles, e.g. filtered);
    ``exclude``: a text file of particle rows to skip."""
    check_output(output, overwrite=overwrite)
    proj = ParticleStack.from_path(projections)
    ptcl = ParticleStack.from_path(usefilt or particles)
    try:
        if proj.box != ptcl.box:
            raise CryorefineError(
                f"{ptcl.label}: box {ptcl.box} px differs from {proj.label} ({proj.box} px)"
            )
        skip = None if exclude is None else _read_exclude(exclude, len(ptcl))
        refs = proj.read()
        attrs = {
            "apix": ptcl.apix,
            "options": repr(cfg),
            "projection_file": str(projections),
            "particle_file": str(particles),
        }
        with simmx_writer(output, len(ptcl), len(refs), attrs, overwrite=overwrite) as out:
            for idx, part in simmx_rows(refs, ptcl, cfg, exclude=skip, progress=progress):
                out.write(idx, part)
    finally:
        proj.close()
        ptcl.close()
    return len(ptcl), len(refs)


def particle_chunk(box: int, cells: int) -> int:
    """Particles per chunk so that one chunk's working memory stays near the simmx
    budget (:mod:`cryorefine.memory`): about ``50 box^2`` bytes per particle (the
    particle and its mirror, their transforms and temporaries) plus ``100`` per
    computed cell."""
    return max(1, int(memory.budget("simmx") // (50 * box * box + 100 * cells)))


def fill_uncomputed(result: Simmx) -> None:
    """Cells left at ``WORST`` by a restricted search become ``max(row) + 1e-4``."""
    s = result.score
    computed = s < WORST
    row_max = np.where(computed, s, -np.inf).max(axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, WORST)
    result.score[:] = np.where(computed, s, row_max + UNCOMPUTED_MARGIN)


def _read_exclude(path: Path, n: int) -> np.ndarray:
    try:
        values = [int(x) for x in Path(path).read_text().split()]
    except (OSError, ValueError) as err:
        raise CryorefineError(f"--exclude {path}: {err}") from None
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise CryorefineError(f"--exclude {path}: particle {bad[0]} is not in 0..{n - 1}")
    return np.asarray(values, np.int64)


#: the value of a row never written (an excluded particle), per field
UNWRITTEN = {"score": WORST, "scale": 1.0}


@dataclass
class SimmxRows:
    """Rows of a similarity matrix file being written (:func:`simmx_writer`)."""

    writer: HdfMatrixWriter

    def write(self, rows: np.ndarray, part: Simmx) -> None:
        """Write ``part``'s rows at the particle rows ``rows`` (increasing)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
        for i, name in enumerate(FIELDS):
            self.writer.write(i, rows, getattr(part, name))


@contextmanager
def simmx_writer(
    path: Path, n_p: int, nc: int, attrs: dict, *, overwrite: bool = False
) -> Iterator[SimmxRows]:
    """A similarity matrix file of ``n_p`` particles x ``nc`` projections in EMAN2's
    layout (spec ch03 §2.3): an ``.hdf`` stack of 6 float32 images ``nx = nc``,
    ``ny = n_p`` (score, dx, dy, dalpha, flip, scale), with ``attrs`` (among them
    ``projection_file`` and ``particle_file``) on image 0. Written row chunk by row
    chunk, so that the matrix is never whole in memory; the file appears under
    ``path`` only when the block completes. Rows never written hold ``WORST`` scores
    (an excluded particle's)."""
    fill = [UNWRITTEN.get(name, 0.0) for name in FIELDS]
    headers = [dict(attrs)] + [{} for _ in FIELDS[1:]]
    with HdfMatrixWriter(
        path, len(FIELDS), n_p, nc, fill=fill, headers=headers, overwrite=overwrite
    ) as w:
        yield SimmxRows(w)


def write_simmx(path: Path, result: Simmx, *, overwrite: bool = False) -> None:
    """An EMAN2 similarity matrix file (:func:`simmx_writer`) of the whole ``result``."""
    n_p, nc = result.score.shape
    with simmx_writer(path, n_p, nc, result.attrs, overwrite=overwrite) as out:
        out.write(np.arange(n_p), result)


@contextmanager
def _open_simmx(path: Path) -> Iterator[MatrixFile]:
    """A similarity matrix file: EMAN2's ``.hdf`` (1, 5 or 6 images; absent alignment
    images read as 0, scale as 1), or cryorefine 0.1's ``.h5`` datasets."""
    with MatrixFile(
        path,
        FIELDS,
        (1, 5, 6),
        legacy="cryorefine simmx 1",
        what="similarity matrix",
        absent={"scale": UNWRITTEN["scale"]},
    ) as f:
        yield f


def simmx_shape(path: Path) -> tuple[int, int]:
    """``(particles, projections)`` of a similarity matrix file."""
    with _open_simmx(path) as f:
        return tuple(f.shape)


def read_simmx_rows(path: Path, rows: int = 4096) -> Iterator[tuple[np.ndarray, Simmx]]:
    """A similarity matrix file ``rows`` particles at a time: yields ``(row indices,
    part)``, so that it is never whole in memory."""
    with _open_simmx(path) as f:
        n_p = f.shape[0]
        for start in range(0, n_p, rows):
            stop = min(start + rows, n_p)
            yield np.arange(start, stop), Simmx(**f.read(start, stop))


def read_simmx(path: Path) -> Simmx:
    """Read a whole similarity matrix file (EMAN2 ``.hdf`` or cryorefine ``.h5``)."""
    with _open_simmx(path) as f:
        return Simmx(**f.read(0, f.shape[0]), attrs=dict(f.attrs))
