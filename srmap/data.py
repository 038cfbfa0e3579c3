"""Training data: aligned LR/HR patches (:class:`PatchDataset`), their order (:class:`StepBatchSampler`), the loader.

Every patch is a pure function of (seed, index), and global batch ``b`` is
indices ``[b*B, (b+1)*B)``, so the data of a step depends on the step alone:
the same under any number of processes or DataLoader workers, and after a
resume. The ``.npy`` files come from the degrade stage (:mod:`srmap.prepare`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from srmap.resize import mirror_index

MANIFEST = "manifest.json"  # written last by srmap.prepare.degrade_split; lists the pairs and their shapes


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

    ``hr_context`` > 0 widens every HR patch by that many HR pixels on each
    side, read from the image around the patch (mirrored past the image edge
    by MATLAB's rule, :func:`srmap.resize.mirror_index`, as the LR was made),
    and transformed with it; its centre is the HR patch of ``hr_context=0``,
    and the crop positions do not change. The fidelity term uses the ring
    (``srmap.losses.fidelity_loss``'s ``hr_context``).
    """

    def __init__(self, root: Path, *, lr_patch: int = 48, scale: int = 4, length: int, seed: int = 0,
                 hr_context: int = 0):
        self.root = Path(root)
        self.lr_patch, self.scale, self.length, self.seed = int(lr_patch), int(scale), int(length), int(seed)
        self.hr_context = int(hr_context)
        if self.lr_patch < 1 or self.scale < 1 or self.length < 1 or self.seed < 0 or self.hr_context < 0:
            raise ValueError(f"PatchDataset: lr_patch={lr_patch}, scale={scale}, length={length}, seed={seed}, "
                             f"hr_context={hr_context}; expected positive integers and a non-negative seed and "
                             f"context")
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
        """Sample ``i``: (LR uint8 (3, p, p), HR uint8 (3, q, q)), the same crop and transform, where
        ``q = p*scale + 2*hr_context``."""
        if not 0 <= i < self.length:
            raise IndexError(f"PatchDataset index {i} out of range [0, {self.length})")
        k = self.image_index(i)
        lr_img, hr_img = self._maps()[k]
        rng = np.random.default_rng([self.seed, 1, i])
        p, s = self.lr_patch, self.scale
        h, w = self.lr_shapes[k]
        y, x, op = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1)), int(rng.integers(8))
        lr = _dihedral(lr_img[y:y + p, x:x + p], op)  # (p, p, 3) view of the map
        c = self.hr_context
        if c == 0:
            hr = _dihedral(hr_img[y * s:(y + p) * s, x * s:(x + p) * s], op)  # (p*s, p*s, 3)
        else:  # rows and columns past the image edge mirror as imresize's do
            rows = mirror_index(np.arange(y * s - c, (y + p) * s + c), h * s)
            cols = mirror_index(np.arange(x * s - c, (x + p) * s + c), w * s)
            hr = _dihedral(hr_img[rows[:, None], cols[None, :]], op)  # (p*s+2c, p*s+2c, 3)
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


class StepBatchSampler(Sampler):
    """Yields, for steps ``start_step .. total_steps-1``, this rank's dataset indices of that step.

    Global batch ``b`` is indices ``[b*B, (b+1)*B)``. It is cut into ``groups``
    equal contiguous parts (1 for pretraining; 2 for the GAN: LR half, HR half)
    and rank ``r`` of ``world`` takes the r-th slice of every part, so the
    union over ranks is the single-process batch, in the same pairing.
    """

    def __init__(self, *, start_step: int, total_steps: int, batch_size: int, rank: int = 0, world: int = 1,
                 groups: int = 1):
        if batch_size % (groups * world):
            raise ValueError(f"batch_size {batch_size} must be divisible by {groups * world} "
                             f"({groups} part(s) x {world} process(es))")
        self.start, self.total, self.batch = start_step, total_steps, batch_size
        self.rank, self.world, self.groups = rank, world, groups

    def indices(self, step: int) -> list[int]:
        """This rank's dataset indices for global step ``step`` (0-based)."""
        part = self.batch // self.groups
        local = part // self.world
        out: list[int] = []
        for g in range(self.groups):
            lo = step * self.batch + g * part + self.rank * local
            out.extend(range(lo, lo + local))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


def step_loader(data_dir: Path, *, lr_patch: int, scale: int, seed: int, total_steps: int, batch_size: int,
                start_step: int, end_step: int, rank: int, world: int, groups: int, workers: int,
                pin_memory: bool, hr_context: int = 0) -> DataLoader:
    """This rank's batches of steps [start_step, end_step) of a run of ``total_steps``: uint8 (LR, HR) pairs,
    LR (n,3,p,p) and HR (n,3,p*scale+2*hr_context, same), ``n = batch_size / world``; see
    :class:`StepBatchSampler` and :class:`PatchDataset`."""
    dataset = PatchDataset(data_dir, lr_patch=lr_patch, scale=scale, length=total_steps * batch_size, seed=seed,
                           hr_context=hr_context)
    sampler = StepBatchSampler(start_step=start_step, total_steps=min(end_step, total_steps), batch_size=batch_size,
                               rank=rank, world=world, groups=groups)
    # A private generator: creating the iterator would otherwise draw from the
    # global RNG and shift the noise stream of a resumed run by one draw.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))
