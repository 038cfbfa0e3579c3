"""Training-patch throughput: memory-mapped .npy PatchDataset vs decoding the PNGs for every sample.

Makes ``--images`` synthetic DIV2K-sized (2040x1356) HR photos in a temporary
folder, runs the degrade step on them (LR by MATLAB-exact imresize), and then
samples (LR 48x48, HR 192x192) pairs with random crops, flips and rotations in
one process on one core:

* ours: ``PatchDataset`` over ``degrade_split(fmt='npy')`` memory maps;
* baseline: BasicSR's "disk" mode, decoding the HR and LR PNG of every sample
  and then cropping (the same crop/transform code).

    PYTHONPATH=. python benchmarks/bench_data.py [--samples 5000] [--baseline-samples 30]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, as one DataLoader worker has

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from srmap.data import PatchDataset, _dihedral  # noqa: E402
from srmap.prepare import degrade_split  # noqa: E402
from srmap.imageio import write_png  # noqa: E402


def make_hr_images(folder: Path, count: int, height: int = 1356, width: int = 2040) -> None:
    """``count`` photo-like uint8 PNGs (skimage photos enlarged, plus sensor-like noise) in ``folder``."""
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for k in range(count):
        base = Image.fromarray(sources[k % len(sources)]).resize((width, height), Image.LANCZOS)
        img = np.asarray(base, np.float64) + rng.normal(0, 3, (height, width, 3))
        write_png(folder / f"{k + 1:04d}.png", np.clip(img, 0, 255).round().astype(np.uint8))


class DecodeEverySample(torch.utils.data.Dataset):
    """BasicSR-style disk mode: decode the HR and LR PNG of the chosen image at every ``__getitem__``."""

    def __init__(self, root: Path, stems: list[str], *, lr_patch: int, scale: int, seed: int):
        self.root, self.stems, self.p, self.s, self.seed = root, stems, lr_patch, scale, seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        stem = self.stems[int(rng.integers(len(self.stems)))]
        hr = np.asarray(Image.open(self.root / "hr" / f"{stem}.png").convert("RGB"))
        lr = np.asarray(Image.open(self.root / "lr" / f"{stem}.png").convert("RGB"))
        p, s = self.p, self.s
        y, x, op = int(rng.integers(lr.shape[0] - p + 1)), int(rng.integers(lr.shape[1] - p + 1)), int(rng.integers(8))
        lr_patch = _dihedral(lr[y:y + p, x:x + p], op)
        hr_patch = _dihedral(hr[y * s:(y + p) * s, x * s:(x + p) * s], op)
        return (torch.from_numpy(np.ascontiguousarray(lr_patch.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(hr_patch.transpose(2, 0, 1))))


def pairs_per_second(dataset, n: int) -> float:
    """Samples ``dataset[0..n)`` (after 3 warm-up samples) and returns pairs per second."""
    for i in range(3):
        dataset[i]
    t0 = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Build the temporary data set, time both samplers and print pairs/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="synthetic 2040x1356 HR images")
    parser.add_argument("--samples", type=int, default=5000, help="pairs drawn from PatchDataset")
    parser.add_argument("--baseline-samples", type=int, default=30, help="pairs drawn by decoding PNGs")
    parser.add_argument("--lr-patch", type=int, default=48)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="srmap-bench-data-") as tmp:
        tmp = Path(tmp)
        make_hr_images(tmp / "hr_in", args.images)
        degrade_split(tmp / "hr_in", tmp / "npy", fmt="npy", max_pixels=40_000_000, progress=False)
        stems = degrade_split(tmp / "hr_in", tmp / "png", fmt="png", max_pixels=40_000_000, progress=False)
        ours = PatchDataset(tmp / "npy", lr_patch=args.lr_patch, scale=4, length=args.samples + 3, seed=0)
        baseline = DecodeEverySample(tmp / "png", stems, lr_patch=args.lr_patch, scale=4, seed=0)
        rate_ours = pairs_per_second(ours, args.samples)
        rate_base = pairs_per_second(baseline, args.baseline_samples)
    p = args.lr_patch
    print(f"(LR {p}x{p}, HR {4 * p}x{4 * p}) uint8 pairs from {args.images} images of 2040x1356, one process, "
          f"one thread")
    print(f"PatchDataset (memory-mapped .npy): {rate_ours:10.0f} pairs/s  ({args.samples} samples)")
    print(f"decode HR+LR PNG per sample:        {rate_base:10.1f} pairs/s  ({args.baseline_samples} samples)")
    print(f"speed-up: {rate_ours / rate_base:.0f}x")
    if args.json:
        args.json.write_text(json.dumps({"pairs_per_s": rate_ours, "baseline_pairs_per_s": rate_base,
                                         "speedup": rate_ours / rate_base}, indent=2) + "\n")


if __name__ == "__main__":
    main()
