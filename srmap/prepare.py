"""Preparing the data sets: the demo's scikit-image photographs and the degrade stage's HR/LR pairs.

:func:`fetch_skimage` writes the photographs that ship inside scikit-image (the
demo and study profiles' ``download`` stage; DIV2K is :mod:`srmap.download`).
:func:`degrade_split` is the ``degrade`` stage: it decodes every HR PNG once and
stores HR and MATLAB-bicubic x4 LR as ``.npy`` (uint8 HxWx3) for training, or
as PNG for validation; :class:`srmap.data.PatchDataset` memory-maps the
``.npy`` files, so sampling a patch is a slice copy instead of a PNG decode
(BasicSR's "disk" mode decodes two PNGs per sample).
"""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from srmap.data import MANIFEST
from srmap.imageio import DEFAULT_MAX_PIXELS, ImageConversionWarning, array_to_rgb, read_rgb8, write_png
from srmap.resize import imresize, mod_crop
from srmap.utils import atomic_path, atomic_write_json

# scikit-image sample images that ship inside the wheel (no pooch download).
# motorcycle_left/right are the two views of skimage.data.stereo_motorcycle().
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
    "motorcycle_left", "motorcycle_right", "page", "retina", "rocket", "text",
)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as .npy atomically (via a file object, so numpy does not append a suffix)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _load_skimage(name: str) -> np.ndarray:
    """Decode one scikit-image sample image by name (see SKIMAGE_IMAGES)."""
    import skimage.data

    try:
        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            return left if name == "motorcycle_left" else right
        return getattr(skimage.data, name)()
    except (ImportError, OSError, ValueError) as e:
        raise RuntimeError(f"fetch_skimage: scikit-image could not load {name!r} offline ({e})") from e


def fetch_skimage(names: Sequence[str], out_dir: Path, *, multiple: int = 4) -> list[Path]:
    """Write scikit-image sample images as ``out_dir/<name>.png`` (uint8 RGB, mod-cropped to ``multiple``).

    No network: only images bundled with scikit-image are offered (SKIMAGE_IMAGES).
    Returns the written paths in the order of ``names``.
    """
    names = list(names)
    unknown = [n for n in names if n not in SKIMAGE_IMAGES]
    if unknown:
        raise ValueError(f"fetch_skimage: unknown image name(s) {unknown}; available offline: "
                         f"{', '.join(SKIMAGE_IMAGES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"fetch_skimage: duplicate names in {names}")
    out_dir = Path(out_dir)
    paths = []
    for name in names:
        notes: list[str] = []
        raw = _load_skimage(name)
        rgb, alpha = array_to_rgb(raw, f"skimage.data.{name}", notes)
        if rgb.dtype == np.uint16:
            rgb = (rgb >> 8).astype(np.uint8)
            notes.append("16-bit to 8-bit (high byte)")
        if alpha is not None:
            notes.append("alpha channel dropped")
        if notes:
            warnings.warn(f"skimage.data.{name}: converted {raw.dtype} {'x'.join(map(str, raw.shape))} image to "
                          f"8-bit RGB ({', '.join(notes)})", ImageConversionWarning, stacklevel=2)
        img = mod_crop(rgb, multiple)
        path = out_dir / f"{name}.png"
        write_png(path, img)
        paths.append(path)
    return paths


def _degrade_one(job: tuple[Path, Path, int, str, int, int]) -> tuple[str, list[int], list[int]]:
    """Worker of :func:`degrade_split`: one HR PNG -> HR/LR pair on disk; returns (stem, hr shape, lr shape)."""
    path, out_dir, scale, fmt, max_pixels, min_hr_size = job
    hr = mod_crop(read_rgb8(path, max_pixels=max_pixels), scale)
    h, w = hr.shape[:2]
    if min(h, w) < max(min_hr_size, scale):
        raise ValueError(f"{path}: {h}x{w} after cropping to a multiple of {scale} is smaller than one "
                         f"training patch ({min_hr_size}x{min_hr_size} HR pixels); remove the image or "
                         f"lower lr_patch")
    lr = imresize(hr, 1.0 / scale, rounding="half_away")
    if fmt == "npy":
        _write_npy(out_dir / "hr" / f"{path.stem}.npy", hr)
        _write_npy(out_dir / "lr" / f"{path.stem}.npy", lr)
    else:
        write_png(out_dir / "hr" / f"{path.stem}.png", hr)
        write_png(out_dir / "lr" / f"{path.stem}.png", lr)
    return path.stem, list(hr.shape), list(lr.shape)


def degrade_split(hr_dir: Path, out_dir: Path, *, scale: int = 4, fmt: str = "npy", workers: int = 1,
                  max_pixels: int = DEFAULT_MAX_PIXELS, min_hr_size: int = 0, progress: bool = True) -> list[str]:
    """Make the bicubic LR counterpart of every ``hr_dir/*.png``.

    Each HR image is read (uint8 RGB), cropped top-left to a multiple of
    ``scale`` and downscaled with MATLAB-exact ``imresize(hr, 1/scale)``
    (uint8, ties away from zero). ``fmt='npy'`` writes ``out_dir/{hr,lr}/<stem>.npy``
    (uint8 HxWx3, memory-mappable, for training); ``fmt='png'`` writes
    ``out_dir/{hr,lr}/<stem>.png`` (validation). ``out_dir/manifest.json`` is
    written last. Images run in ``workers`` processes. Returns the sorted stems.
    """
    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    if fmt not in ("npy", "png"):
        raise ValueError(f"degrade_split: fmt={fmt!r}; expected 'npy' or 'png'")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"degrade_split: scale={scale}; expected a positive integer")
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"degrade_split: HR folder {hr_dir} does not exist")
    paths = sorted(hr_dir.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"degrade_split: no *.png images in {hr_dir}")
    jobs = [(p, out_dir, int(scale), fmt, int(max_pixels), int(min_hr_size)) for p in paths]
    bar = dict(total=len(jobs), desc=f"degrade {hr_dir.name}", unit="img", disable=not progress)
    if workers <= 1 or len(jobs) == 1:
        results = [_degrade_one(j) for j in tqdm(jobs, **bar)]
    else:
        # spawn: workers start clean instead of inheriting the parent's threads (torch/BLAS pools)
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_degrade_one, jobs), **bar))
    atomic_write_json(out_dir / MANIFEST, {
        "scale": int(scale), "fmt": fmt,
        "images": [{"stem": s, "hr_shape": hs, "lr_shape": ls} for s, hs, ls in results],
    })
    return [s for s, _, _ in results]
