"""Benchmark: scoring one DIV2K-sized image (2040x1356) with 10 SR samples.

Baseline: a faithful re-implementation of the per-image path of the official
NTIRE 2021 ``measure.py`` (andreas128/NTIRE21_Learning_SR_Space): one sample
at a time, LPIPS called without ``torch.no_grad`` on (sample, GT) so the GT's
features are recomputed for every sample, and a numpy MATLAB-bicubic port
(gather-and-sum "vec" mode, rounded to uint8 after each pass) that downscales
the GT again for every sample. Both paths use the same LPIPS network (the
untrained backbone: timing does not depend on the weights) and must produce
the same numbers, which the script checks.

Measured: ``ntire_scores`` (the same four numbers as the official script) and
``score_image`` (those plus BasicSR PSNR/SSIM in RGB and Y, which the
official script does not compute).

    PYTHONPATH=. python benchmarks/bench_eval.py            # 2040x1356, 10 samples (about 2 minutes on 2 cores)
    PYTHONPATH=. python benchmarks/bench_eval.py --height 512 --width 512   # quick look
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srmap.evaluate import ntire_scores, score_image  # noqa: E402
from srmap.metrics import LPIPS  # noqa: E402

# ---------------------------------------------------------------------------
# Baseline: the official script's per-image path
# ---------------------------------------------------------------------------


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
            + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's weights and mirrored 0-based indices for one axis, (out_len, P) each."""
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    ind = left[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]  # 1-based, as MATLAB
    w = scale * _cubic(scale * (u[:, None] - ind)) if scale < 1 else _cubic(u[:, None] - ind)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    ind = mirror[np.mod(ind.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)
    return w[:, keep], ind[:, keep]


def numpy_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """uint8 HxWx3 -> uint8, MATLAB bicubic with np.around after each pass (the numpy port the NTIRE script imports)."""
    out = img
    for dim in (0, 1):  # equal scales: rows first
        n = out.shape[dim]
        w, ind = _taps(n, int(math.ceil(n * scale)), scale)
        if dim == 0:
            acc = np.sum(w[:, :, None, None] * out[ind].astype(np.float64), axis=1)
        else:
            acc = np.sum(w[None, :, :, None] * out[:, ind].astype(np.float64), axis=2)
        out = np.around(np.clip(acc, 0, 255)).astype(np.uint8)
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.Tensor(np.expand_dims(a.transpose([2, 0, 1]), axis=0).astype(np.float32)) / 255


def _skimage_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(a, b))


def official_per_image(gt: np.ndarray, srs: list[np.ndarray], loss_fn, scale: int = 4) -> dict[str, float]:
    """The official ``lpips_analysis`` on in-memory arrays (no file reading, no printing)."""
    h, w, _ = gt.shape
    gt = gt[:(h // 8) * 8, :(w // 8) * 8]
    maps, lpips_gl, lrpsnrs = [], [], []
    for sr in srs:
        h1, w1, _ = gt.shape
        sr = sr[:h1, :w1]
        sp = loss_fn(2 * _t(sr) - 1, 2 * _t(gt) - 1)  # autograd on, as in measure.py
        maps.append(sp)
        lpips_gl.append(sp.mean().item())
        lrpsnrs.append(_skimage_psnr(numpy_imresize(sr, 1 / scale), numpy_imresize(gt, 1 / scale)))
    stacked = torch.stack([m[0, 0] for m in maps], dim=2)
    best, _ = torch.min(stacked, dim=2)
    gl, loc = np.min(lpips_gl), best.mean().item()
    return {"LPIPS_mean": float(np.mean(lpips_gl)), "LRPSNR_mean": float(np.mean(lrpsnrs)),
            "LRPSNR_worst": float(np.min(lrpsnrs)), "score": float((gl - loc) / gl * 100)}


# ---------------------------------------------------------------------------


def _images(height: int, width: int, samples: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A smooth synthetic GT and SR samples that differ from it (and each other) in texture and LR content."""
    from srmap.resize import imresize

    rng = np.random.default_rng(seed)
    base = imresize(rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255, output_size=(height, width))
    gt = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    srs = [np.clip(gt.astype(np.float64) + rng.normal(0, 6 + k, gt.shape) + k - 5, 0, 255).astype(np.uint8)
           for k in range(samples)]
    return gt, srs


def _time(fn, repeat: int):
    """Best-of-``repeat`` (wall seconds, process CPU seconds) and the last result.

    CPU time (all threads of this process) is the steadier number on a shared
    machine, where other jobs stretch the wall clock unevenly between paths.
    """
    best, out = (math.inf, math.inf), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, out


def main(argv=None) -> int:
    """Run the benchmark; prints seconds, ratios and the agreement of the numbers. Returns 1 if they disagree."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=1356)
    ap.add_argument("--width", type=int, default=2040)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per path")
    args = ap.parse_args(argv)

    gt, srs = _images(args.height, args.width, args.samples)
    lpips = LPIPS(pretrained=False)
    # The official script's network: same weights, default (contiguous NCHW) layout, as lpips.LPIPS builds it.
    official = copy.deepcopy(lpips.model).to(memory_format=torch.contiguous_format)
    print(f"image {args.width}x{args.height}, {args.samples} samples, torch threads {torch.get_num_threads()}")
    # Warm both paths up (oneDNN primitive caches, lazy imports) so neither pays first-call costs.
    small_gt, small_srs = gt[:64, :64], [s[:64, :64] for s in srs[:2]]
    official_per_image(small_gt, small_srs, official)
    score_image(small_gt, small_srs, lpips)
    t_base, ref = _time(lambda: official_per_image(gt, srs, official), args.repeat)
    t_ntire, ours = _time(lambda: ntire_scores(gt, srs, lpips), args.repeat)
    t_full, full = _time(lambda: score_image(gt, srs, lpips, crop_border=4), args.repeat)

    print(f"{'path':46s} {'wall s':>7s} {'speed-up':>9s} {'CPU s':>7s} {'speed-up':>9s}")
    for name, (wall, cpu) in (("official measure.py per-image path (baseline)", t_base),
                              ("srmap ntire_scores (same 4 numbers)", t_ntire),
                              ("srmap score_image (+ PSNR/SSIM RGB and Y)", t_full)):
        print(f"{name:46s} {wall:7.2f} {t_base[0] / wall:8.2f}x {cpu:7.2f} {t_base[1] / cpu:8.2f}x")
    ok = True
    for key, tol in (("LPIPS_mean", 1e-5), ("LRPSNR_mean", 1e-6), ("LRPSNR_worst", 1e-6), ("score", 1e-3)):
        diff = abs(ref[key] - ours[key])
        ok &= diff <= tol and full[key] == ours[key]
        print(f"  {key:13s} official {ref[key]:.6f}  srmap {ours[key]:.6f}  |diff| {diff:.2e} (tol {tol:g})")
    print("numbers agree" if ok else "NUMBERS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
