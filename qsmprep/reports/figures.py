"""Quality-control figures (PNG), drawn with matplotlib.

Every function takes images or arrays that are already on disk or in memory, draws one
figure and writes it atomically to ``out`` (a ``.png`` path); none computes anything but
display ranges. Images are shown on their own voxel grid, turned to the closest canonical
(RAS) orientation without resampling: sagittal, coronal and axial planes in neurological
convention (the subject's left on the left). Oblique grids are shown along their voxel
axes, whose planes are at most 45 degrees from the world planes.
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

#: The planes, by the canonical axis they cut: name, world axis letter and the edge labels
#: (left, right) of the displayed plane.
_PLANES = {0: ("sagittal", "x", ("P", "A")), 1: ("coronal", "y", ("L", "R")),
           2: ("axial", "z", ("L", "R"))}  # fmt: skip


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


class _View:
    """A 3D image in the closest canonical (RAS) axis order of its grid, for display."""

    def __init__(self, img: nb.Nifti1Image):
        canonical = nb.as_closest_canonical(_as_3d(img))
        self.data = np.asarray(canonical.dataobj, dtype=np.float32)
        self.affine = canonical.affine
        self.zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])

    def like(self, img: nb.Nifti1Image) -> np.ndarray:
        """Another image on the same grid, in this view's axis order."""
        data = _View(img).data
        if data.shape != self.data.shape:
            raise ValueError(f"images of shapes {data.shape} and {self.data.shape} differ")
        return data

    def plane(self, data: np.ndarray, axis: int, index: int) -> np.ndarray:
        """The plane ``index`` across ``axis`` as an image array (rows: the upward axis)."""
        return np.take(data, index, axis=axis).T

    def extent(self, axis: int) -> tuple[float, float, float, float]:
        """imshow's extent (mm) of a plane across ``axis``."""
        h, v = (a for a in range(3) if a != axis)
        return (0.0, self.data.shape[h] * self.zooms[h], 0.0, self.data.shape[v] * self.zooms[v])

    def world(self, axis: int, index: int) -> float:
        """World coordinate (mm, along ``axis``) of the plane's centre."""
        ijk = (np.array(self.data.shape) - 1) / 2
        ijk[axis] = index
        return float((self.affine @ np.r_[ijk, 1.0])[axis])


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel indices of the mask's centre of mass (the grid's centre when it is empty)."""
    ijk = np.argwhere(mask).mean(axis=0) if mask.any() else (np.array(mask.shape) - 1) / 2
    return tuple(int(round(v)) for v in ijk)


def _cuts(mask: np.ndarray, axis: int, n: int, margin: float = 0.1) -> list[int]:
    """Up to ``n`` distinct planes across ``axis``, evenly spread over the mask's extent
    less ``margin`` of it at each end."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other)) if mask.any() else np.arange(mask.shape[axis])
    lo, hi = present.min(), present.max()
    positions = lo + (hi - lo) * np.linspace(margin, 1 - margin, n)
    return sorted({int(round(p)) for p in positions})


def _cmap(name: str):
    return _plt().get_cmap(name).with_extremes(bad="black")


def _draw(ax, view: _View, data: np.ndarray, axis: int, index: int, *, cmap: str,
          vmin: float, vmax: float, contours: Sequence[np.ndarray] = (),
          linewidth: float = 1.0, label: bool = True):  # fmt: skip
    """One plane of ``data`` (NaN shows black) with the outlines of ``contours``."""
    extent = view.extent(axis)
    im = ax.imshow(view.plane(data, axis, index), cmap=_cmap(cmap), vmin=vmin, vmax=vmax,
                   origin="lower", extent=extent, interpolation="nearest")  # fmt: skip
    h, v = (a for a in range(3) if a != axis)
    xs = (np.arange(view.data.shape[h]) + 0.5) * view.zooms[h]
    ys = (np.arange(view.data.shape[v]) + 0.5) * view.zooms[v]
    for mask in contours:
        m = view.plane(mask, axis, index).astype(np.float32)
        if 0 < m.sum() < m.size:
            ax.contour(xs, ys, m, levels=[0.5], colors=[CONTOUR_COLOR], linewidths=linewidth)
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if label:
        _, letter, (left, right) = _PLANES[axis]
        style = {"color": "white", "fontsize": 7, "transform": ax.transAxes}
        ax.text(0.02, 0.02, f"{letter}={round(view.world(axis, index))}", **style)
        ax.text(0.02, 0.92, left, **style)
        ax.text(0.98, 0.92, right, ha="right", **style)
    return im


def _colorbar(fig, im, axes, label: str = "") -> None:
    bar = fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01)
    bar.ax.tick_params(colors="white", labelsize=7)
    bar.outline.set_edgecolor("white")
    if label:
        bar.set_label(label, color="white", fontsize=8)


def _mosaic(view: _View, data: np.ndarray, mask: np.ndarray, *, cmap: str, vmin: float,
            vmax: float, contours: Sequence[np.ndarray] = (), n: int = 5,
            title: str = "", bar: str | None = None):  # fmt: skip
    """Three rows (sagittal, coronal, axial) of ``n`` planes through ``mask``'s extent."""
    plt = _plt()
    fig, axes = plt.subplots(3, n, figsize=(11, 5.4), facecolor="black", squeeze=False)
    im = None
    for axis in range(3):
        cuts = _cuts(mask, axis, n)
        for col, ax in enumerate(axes[axis]):
            if col >= len(cuts):
                ax.axis("off")
                continue
            im = _draw(ax, view, data, axis, cuts[col], cmap=cmap, vmin=vmin, vmax=vmax,
                       contours=contours)  # fmt: skip
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    if bar is not None and im is not None:
        _colorbar(fig, im, axes, bar)
    return fig


def _ortho_row(fig, axes, view: _View, data: np.ndarray, centre: Sequence[int], *, cmap: str,
               vmin: float, vmax: float, title: str, bar: str = "") -> None:  # fmt: skip
    """Sagittal, coronal and axial planes through ``centre`` on three axes, a colour bar."""
    im = None
    for axis, ax in enumerate(axes):
        im = _draw(ax, view, data, axis, centre[axis], cmap=cmap, vmin=vmin, vmax=vmax)
    axes[0].set_title(title, color="white", fontsize=9, loc="left")
    _colorbar(fig, im, list(axes), bar)


def _masked(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, data, np.nan).astype(np.float32)


def symmetric_limit(values: np.ndarray, percentile: float = 99.0) -> float:
    """A symmetric display limit: the ``percentile`` of ``|values|`` (1.0 if all are zero)."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    values = values[np.isfinite(values)]
    limit = float(np.percentile(values, percentile)) if values.size else 0.0
    return limit if limit > 0 else 1.0


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    """Display range of an anatomical image: 0.5th to 99.5th percentile of finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return lo, hi if hi > lo else lo + 1.0


def plot_mask(mag: nb.Nifti1Image, mask: nb.Nifti1Image, out: str | os.PathLike) -> Path:
    """The brain mask's outline over the magnitude, in three planes (several cuts each)."""
    view = _View(mag)
    m = view.like(mask) > 0
    vmin, vmax = _robust_range(view.data)
    fig = _mosaic(view, view.data, m, cmap="gray", vmin=vmin, vmax=vmax, contours=[m])
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
    plt = _plt()
    view = _View(mask)
    m = view.data > 0
    u = view.like(unwrapped)
    centred = u - np.float32(np.median(u[m])) if m.any() else u
    limit = symmetric_limit(centred[m] if m.any() else centred, 99.5)
    centre = _centre(m)
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.4), facecolor="black")
    _ortho_row(fig, axes[0], view, _masked(view.like(wrapped), m), centre, cmap="twilight",
               vmin=-np.pi, vmax=np.pi, title=f"wrapped {title}".strip(), bar="rad")  # fmt: skip
    _ortho_row(fig, axes[1], view, _masked(centred, m), centre, cmap="RdBu_r", vmin=-limit,
               vmax=limit, title="unwrapped (rad, minus its median)", bar="rad")  # fmt: skip
    return save_figure(fig, out)


def plot_fields(
    total_hz: nb.Nifti1Image | None,
    local_ppm: nb.Nifti1Image,
    mask: nb.Nifti1Image,
    out: str | os.PathLike,
) -> Path:
    """Total field (Hz) and local field (ppm) in the mask, each on a symmetric diverging
    scale (+-99th percentile of its absolute value), in three planes."""
    plt = _plt()
    view = _View(mask)
    m = view.data > 0
    panels = []
    if total_hz is not None:
        panels.append((total_hz, "total field", "Hz"))
    panels.append((local_ppm, "local field", "ppm"))
    centre = _centre(m)
    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3.2 * len(panels)),
                             facecolor="black", squeeze=False)  # fmt: skip
    for row, (img, label, unit) in zip(axes, panels, strict=True):
        data = view.like(img)
        limit = symmetric_limit(data[m] if m.any() else data)
        _ortho_row(fig, row, view, _masked(data, m), centre, cmap="RdBu_r", vmin=-limit,
                   vmax=limit, title=f"{label} ({unit}), +-{limit:.3g}", bar=unit)  # fmt: skip
    return save_figure(fig, out)


def plot_chimap(
    chi: nb.Nifti1Image, out: str | os.PathLike, window: float = CHI_WINDOW_PPM
) -> Path:
    """Susceptibility mosaic in three planes with a fixed grey window of +-``window`` ppm
    and a colour bar."""
    view = _View(chi)
    inside = np.isfinite(view.data) & (view.data != 0)
    fig = _mosaic(view, view.data, inside, cmap="gray", vmin=-window, vmax=window,
                  title=f"chi (ppm), window +-{window:g}", bar="ppm")  # fmt: skip
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
    in axial planes through the ROIs."""
    plt = _plt()
    view = _View(background)
    lab = np.rint(view.like(rois)).astype(np.int32)
    present = [int(v) for v in (labels if labels is not None else np.unique(lab)) if v > 0]
    inside = np.isin(lab, present)
    cuts = _cuts(inside, 2, 5, margin=0.0) if inside.any() else [lab.shape[2] // 2]
    fig, axes = plt.subplots(1, len(cuts), figsize=(11, 2.8), facecolor="black", squeeze=False)
    outlines = [lab == value for value in present]
    for ax, k in zip(axes[0], cuts, strict=True):
        _draw(ax, view, view.data, 2, k, cmap="gray", vmin=-window, vmax=window,
              contours=outlines, linewidth=0.8)  # fmt: skip
    return save_figure(fig, out)
