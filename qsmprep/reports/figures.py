"""Quality-control figures (PNG) from nilearn and matplotlib.

Every function takes images or arrays that are already on disk or in memory, draws one
figure and writes it atomically to ``out`` (a ``.png`` path); none computes anything but
display ranges. Images are shown in world orientation (nilearn resamples oblique grids for
display only).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

#: Default display window of the susceptibility maps (ppm).
CHI_WINDOW_PPM = 0.15

#: Figure resolution (dots per inch).
DPI = 90

#: Colours of the mask and ROI outlines.
CONTOUR_COLOR = "#e8412c"


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plotting():
    _plt()
    from nilearn import plotting

    return plotting


def save_figure(fig, out: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG to ``out`` atomically and close it."""
    from ..interfaces._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor=fig.get_facecolor())
    _plt().close(fig)
    out = Path(out)
    atomic_write_bytes(buf.getvalue(), out)
    return out


def _as_3d(img: nb.Nifti1Image) -> nb.Nifti1Image:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return nb.Nifti1Image(data, img.affine)


def _masked(img: nb.Nifti1Image, mask: np.ndarray) -> nb.Nifti1Image:
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(mask.shape)
    return nb.Nifti1Image(np.where(mask, data, 0).astype(np.float32), img.affine)


def symmetric_limit(values: np.ndarray, percentile: float = 99.0) -> float:
    """A symmetric display limit: the ``percentile`` of ``|values|`` (1.0 if all are zero)."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    values = values[np.isfinite(values)]
    limit = float(np.percentile(values, percentile)) if values.size else 0.0
    return limit if limit > 0 else 1.0


def _centre(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """World coordinates (mm) of the mask's centre of mass."""
    ijk = np.argwhere(mask).mean(axis=0) if mask.any() else (np.array(mask.shape) - 1) / 2
    return tuple(float(v) for v in (affine @ np.r_[ijk, 1.0])[:3])


def plot_mask(mag: nb.Nifti1Image, mask: nb.Nifti1Image, out: str | os.PathLike) -> Path:
    """The brain mask's outline over the magnitude, in three planes (several cuts each)."""
    plotting = _plotting()
    plt = _plt()
    mag3 = _as_3d(mag)
    fig = plt.figure(figsize=(11, 5.4), facecolor="black")
    display = plotting.plot_anat(
        mag3, display_mode="mosaic", cut_coords=5, figure=fig, draw_cross=False,
        annotate=True, dim=0, black_bg=True,
    )  # fmt: skip
    display.add_contours(_as_3d(mask), levels=[0.5], colors=[CONTOUR_COLOR], linewidths=1.2)
    return save_figure(fig, out)


def plot_phase(
    wrapped: nb.Nifti1Image,
    unwrapped: nb.Nifti1Image,
    mask: nb.Nifti1Image,
    out: str | os.PathLike,
    title: str = "",
) -> Path:
    """Wrapped phase (top, [-pi, pi), cyclic colours) and unwrapped phase (bottom, rad,
    symmetric range about its median) of one echo, inside ``mask``, in three planes."""
    plotting = _plotting()
    plt = _plt()
    m = np.asarray(mask.dataobj) > 0
    wrapped3, unwrapped3 = _as_3d(wrapped), _as_3d(unwrapped)
    u = np.asarray(unwrapped3.dataobj, dtype=np.float32)
    centred = u - np.float32(np.median(u[m])) if m.any() else u
    limit = symmetric_limit(centred[m] if m.any() else centred, 99.5)
    cut = _centre(m, mask.affine)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.4), facecolor="black")
    plotting.plot_img(
        _masked(wrapped3, m), display_mode="ortho", cut_coords=cut, axes=axes[0], figure=fig,
        cmap="twilight", vmin=-np.pi, vmax=np.pi, colorbar=True, black_bg=True,
        draw_cross=False, title=f"wrapped {title}".strip(),
    )  # fmt: skip
    plotting.plot_img(
        _masked(nb.Nifti1Image(centred, unwrapped3.affine), m), display_mode="ortho",
        cut_coords=cut, axes=axes[1], figure=fig, cmap="RdBu_r", vmin=-limit, vmax=limit,
        colorbar=True, black_bg=True, draw_cross=False,
        title="unwrapped (rad, minus its median)",
    )  # fmt: skip
    return save_figure(fig, out)


def plot_fields(
    total_hz: nb.Nifti1Image | None,
    local_ppm: nb.Nifti1Image,
    mask: nb.Nifti1Image,
    out: str | os.PathLike,
) -> Path:
    """Total field (Hz) and local field (ppm) in the mask, each on a symmetric diverging
    scale (+-99th percentile of its absolute value), in three planes."""
    plotting = _plotting()
    plt = _plt()
    m = np.asarray(mask.dataobj) > 0
    panels = []
    if total_hz is not None:
        panels.append((total_hz, "total field (Hz)"))
    panels.append((local_ppm, "local field (ppm)"))
    cut = _centre(m, mask.affine)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), facecolor="black")
    axes = np.atleast_1d(axes)
    for ax, (img, label) in zip(axes, panels, strict=True):
        data = np.asarray(_as_3d(img).dataobj, dtype=np.float32)
        limit = symmetric_limit(data[m] if m.any() else data)
        plotting.plot_img(
            _masked(_as_3d(img), m), display_mode="ortho", cut_coords=cut, axes=ax,
            figure=fig, cmap="RdBu_r", vmin=-limit, vmax=limit, colorbar=True,
            black_bg=True, draw_cross=False, title=f"{label}, +-{limit:.3g}",
        )  # fmt: skip
    return save_figure(fig, out)


def plot_chimap(
    chi: nb.Nifti1Image, out: str | os.PathLike, window: float = CHI_WINDOW_PPM
) -> Path:
    """Susceptibility mosaic in three planes with a fixed grey window of +-``window`` ppm
    and a colour bar."""
    plotting = _plotting()
    plt = _plt()
    fig = plt.figure(figsize=(11, 5.4), facecolor="black")
    plotting.plot_img(
        _as_3d(chi), display_mode="mosaic", cut_coords=5, figure=fig, cmap="gray",
        vmin=-window, vmax=window, colorbar=True, black_bg=True, draw_cross=False,
        title=f"chi (ppm), window +-{window:g}",
    )  # fmt: skip
    return save_figure(fig, out)


def plot_histogram(
    values: np.ndarray, out: str | os.PathLike, window: float = CHI_WINDOW_PPM
) -> Path:
    """Histogram of chi values (ppm) over +-2 ``window``, with the mean and +-1 std marked;
    the share of values beyond the range is printed."""
    plt = _plt()
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = -2 * window, 2 * window
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(np.clip(v, lo, hi), bins=120, range=(lo, hi), color="#4a6fa5")
    mean, std = float(v.mean()), float(v.std())
    for x, style in ((mean, "-"), (mean - std, "--"), (mean + std, "--")):
        ax.axvline(x, color="k", linestyle=style, linewidth=0.8)
    outside = float(np.mean((v < lo) | (v > hi))) * 100
    ax.set_xlabel("chi (ppm)")
    ax.set_ylabel("voxels")
    ax.set_yscale("log")
    ax.set_title(f"chi in the mask: mean {mean:.4f}, std {std:.4f} ppm; {outside:.2f} % beyond")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_histograms(
    runs: Mapping[str, np.ndarray], out: str | os.PathLike, window: float = CHI_WINDOW_PPM
) -> Path:
    """One small chi histogram per run (``{name: values}``), on a shared range, in a grid."""
    plt = _plt()
    names = list(runs)
    ncol = min(4, max(1, len(names)))
    nrow = int(np.ceil(len(names) / ncol)) or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    lo, hi = -2 * window, 2 * window
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        v = np.asarray(runs[name], dtype=np.float64).ravel()
        ax.hist(np.clip(v, lo, hi), bins=80, range=(lo, hi), color="#4a6fa5")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("chi (ppm)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_rois(
    background: nb.Nifti1Image,
    rois: nb.Nifti1Image,
    out: str | os.PathLike,
    labels: Sequence[int] | None = None,
    window: float = CHI_WINDOW_PPM,
) -> Path:
    """The outlines of atlas ROIs (label image on the background's grid) over a chi map,
    in axial cuts through the ROIs."""
    plotting = _plotting()
    plt = _plt()
    lab = np.asarray(rois.dataobj).astype(np.int32)
    present = [int(v) for v in (labels if labels is not None else np.unique(lab)) if v > 0]
    inside = np.isin(lab, present)
    centre = np.array(_centre(inside, rois.affine))
    ks = np.unique(np.argwhere(inside)[:, 2]) if inside.any() else np.array([lab.shape[2] // 2])
    cuts = np.linspace(ks.min(), ks.max(), num=min(5, len(ks))).round()
    # world z of each cut through the ROIs' centre (the display's axial axis is world z)
    ijk_centre = np.linalg.solve(rois.affine, np.r_[centre, 1.0])[:3]
    world = [float((rois.affine @ np.r_[ijk_centre[:2], k, 1.0])[2]) for k in cuts]
    fig = plt.figure(figsize=(11, 2.8), facecolor="black")
    display = plotting.plot_img(
        _as_3d(background), display_mode="z", cut_coords=world, figure=fig, cmap="gray",
        vmin=-window, vmax=window, black_bg=True, draw_cross=False, annotate=True,
    )  # fmt: skip
    for value in present:
        display.add_contours(
            nb.Nifti1Image((lab == value).astype(np.float32), rois.affine),
            levels=[0.5], colors=[CONTOUR_COLOR], linewidths=0.8,
        )  # fmt: skip
    return save_figure(fig, out)
