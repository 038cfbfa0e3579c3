"""Images in, training patches out: the demo images, the degrade stage and PatchDataset (files: srmap.imageio).

The degrade stage decodes every HR PNG once and stores HR and x4 LR as ``.npy``
(uint8 HxWx3); :class:`PatchDataset` memory-maps those, so sampling a patch is
a slice copy instead of a PNG decode (BasicSR's "disk" mode decodes two PNGs
per sample).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from srmap.degrade import imresize, mod_crop
from srmap.imageio import ImageConversionWarning, array_to_rgb, read_rgb8, write_png
from srmap.utils import atomic_path, atomic_write_json

MANIFEST = "manifest.json"  # written last by degrade_split; lists the pairs and their shapes

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
                  max_pixels: int, min_hr_size: int = 0, progress: bool = True) -> list[str]:
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


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a uint8 HxWx3 .npy file read-only."""
    return np.load(path, mmap_mode="r")


class PatchDataset(torch.utils.data.Dataset):
    """Aligned random (LR, HR) training patches from a ``degrade_split(fmt='npy')`` folder.

    ``dataset[i]`` is a pure function of ``(seed, i)``: every block of
    ``n_images`` consecutive indices visits each image once in a seeded random
    order, and the crop position and one of the 8 flip/90-degree-rotation
    variants are drawn from a generator seeded with ``(seed, i)``. Any worker,
    process or DDP rank therefore gets the same pair for the same index, and a
    run resumes mid-epoch by index. Arrays are memory-mapped lazily in each
    process (nothing large is pickled to workers).
    """

    def __init__(self, root: Path, *, lr_patch: int = 48, scale: int = 4, length: int, seed: int = 0):
        self.root = Path(root)
        self.lr_patch, self.scale, self.length, self.seed = int(lr_patch), int(scale), int(length), int(seed)
        if self.lr_patch < 1 or self.scale < 1 or self.length < 1 or self.seed < 0:
            raise ValueError(f"PatchDataset: lr_patch={lr_patch}, scale={scale}, length={length}, seed={seed}; "
                             f"expected positive integers and a non-negative seed")
        self.stems = self._find_stems()
        self.lr_shapes = []
        for stem in self.stems:
            hr, lr = _open_npy(self._path("hr", stem)), _open_npy(self._path("lr", stem))
            if hr.dtype != np.uint8 or lr.dtype != np.uint8 or hr.ndim != 3 or lr.ndim != 3:
                raise ValueError(f"{self._path('hr', stem)}: expected uint8 HxWx3 HR/LR arrays")
            if hr.shape != (lr.shape[0] * self.scale, lr.shape[1] * self.scale, lr.shape[2]):
                raise ValueError(f"{self._path('lr', stem)}: LR {lr.shape} is not HR {hr.shape} / {self.scale}")
            if min(lr.shape[:2]) < self.lr_patch:
                raise ValueError(f"{self._path('lr', stem)}: LR {lr.shape[:2]} is smaller than lr_patch="
                                 f"{self.lr_patch}")
            self.lr_shapes.append(lr.shape[:2])
            del hr, lr  # only the shapes are kept; workers map the files themselves
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._pid = -1

    def _path(self, kind: str, stem: str) -> Path:
        """``root/<kind>/<stem>.npy``."""
        return self.root / kind / f"{stem}.npy"

    def _find_stems(self) -> list[str]:
        """Stems listed in the manifest (or, without one, those with both hr/ and lr/ .npy files)."""
        manifest = self.root / MANIFEST
        if manifest.is_file():
            stems = [entry["stem"] for entry in json.loads(manifest.read_text())["images"]]
        else:
            stems = sorted(p.stem for p in (self.root / "hr").glob("*.npy"))
        if not stems:
            raise FileNotFoundError(f"PatchDataset: no hr/*.npy pairs under {self.root} "
                                    f"(run degrade_split(fmt='npy') first)")
        for stem in stems:
            for kind in ("hr", "lr"):
                if not self._path(kind, stem).is_file():
                    raise FileNotFoundError(f"PatchDataset: missing {self._path(kind, stem)}")
        return sorted(stems)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = None, -1  # memory maps are reopened in the receiving process
        return state

    def __len__(self) -> int:
        return self.length

    def _maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This process's memory maps, opened on first use (and again after a fork)."""
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = [(_open_npy(self._path("lr", s)), _open_npy(self._path("hr", s))) for s in self.stems]
            self._pid = os.getpid()
        return self._arrays

    def image_index(self, i: int) -> int:
        """Index into ``self.stems`` of the image that sample ``i`` is cropped from."""
        n = len(self.stems)
        order = np.random.default_rng([self.seed, 0, i // n]).permutation(n)
        return int(order[i % n])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i``: (LR uint8 (3, p, p), HR uint8 (3, p*scale, p*scale)), the same crop and transform."""
        if not 0 <= i < self.length:
            raise IndexError(f"PatchDataset index {i} out of range [0, {self.length})")
        k = self.image_index(i)
        lr_img, hr_img = self._maps()[k]
        rng = np.random.default_rng([self.seed, 1, i])
        p, s = self.lr_patch, self.scale
        h, w = self.lr_shapes[k]
        y, x, op = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1)), int(rng.integers(8))
        lr = _dihedral(lr_img[y:y + p, x:x + p], op)  # (p, p, 3) view of the map
        hr = _dihedral(hr_img[y * s:(y + p) * s, x * s:(x + p) * s], op)  # (p*s, p*s, 3)
        return (torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1))))


def _dihedral(img: np.ndarray, op: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations of an HxWxC view: bit 0 h-flip, bit 1 v-flip, bit 2 transpose."""
    if op & 1:
        img = img[:, ::-1]
    if op & 2:
        img = img[::-1]
    if op & 4:
        img = img.transpose(1, 0, 2)
    return img
