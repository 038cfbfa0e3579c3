"""Time MATLAB-exact imresize(uint8 2040x1356x3, 1/4) against PIL, torch and a per-tap gather port.

Everything runs on one CPU thread in the same process. Besides the times it
prints how far (in uint8 levels) PIL's and torch's bicubic land from the
MATLAB result, and checks that the per-tap port (the algorithm of the numpy
MATLAB ports) gives exactly our result.

    PYTHONPATH=. python benchmarks/bench_resize.py [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core for every contender; set before numpy/torch load BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from srmap.resize import contributions, imresize  # noqa: E402


def test_image(height: int = 1356, width: int = 2040) -> np.ndarray:
    """A DIV2K-sized uint8 photo: skimage's astronaut enlarged (Lanczos) plus mild noise."""
    import skimage.data

    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.LANCZOS)
    noise = np.random.default_rng(0).normal(0, 3, (height, width, 3))
    return np.clip(np.asarray(base, np.float64) + noise, 0, 255).round().astype(np.uint8)


def gather_port(img: np.ndarray, scale: float) -> np.ndarray:
    """Per-tap gather-and-accumulate resize (how the numpy MATLAB ports work), uint8, ties away from zero."""
    a = img.astype(np.float64)
    for axis in (0, 1):
        out_len = math.ceil(scale * img.shape[axis])
        weights, indices = contributions(a.shape[axis], out_len, scale)
        acc = 0.0
        for p in range(weights.shape[1]):
            taps = np.take(a, indices[:, p], axis=axis)
            w = weights[:, p].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
            acc = acc + w * taps
        a = np.floor(np.clip(acc, 0, 255) + 0.5)
    return a.astype(np.uint8)


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs after one warm-up run (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Run the benchmark and print a table of times, ratios and level differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per contender (minimum is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    img = test_image()
    h, w = img.shape[0] // 4, img.shape[1] // 4
    pil = Image.fromarray(img)
    t_u8 = torch.from_numpy(img).permute(2, 0, 1)[None]  # zero-copy view: channels-last uint8
    t_f32 = t_u8.float().contiguous()  # float NCHW input, converted outside the timing

    ours = imresize(img, 0.25)
    outputs = {
        "PIL resize(BICUBIC)": np.asarray(pil.resize((w, h), Image.BICUBIC)),
        "torch interpolate bicubic antialias, uint8": F.interpolate(
            t_u8, size=(h, w), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy(),
        "torch interpolate bicubic antialias, float32": F.interpolate(
            t_f32, size=(h, w), mode="bicubic", antialias=True)[0].permute(1, 2, 0).round().clamp(0, 255)
        .to(torch.uint8).numpy(),
    }
    port = gather_port(img, 0.25)
    assert np.array_equal(port, ours), "per-tap port and imresize disagree"

    contenders = {
        "srmap imresize (MATLAB-exact)": lambda: imresize(img, 0.25),
        "PIL resize(BICUBIC)": lambda: pil.resize((w, h), Image.BICUBIC),
        "torch interpolate bicubic antialias, uint8": lambda: F.interpolate(
            t_u8, size=(h, w), mode="bicubic", antialias=True),
        "torch interpolate bicubic antialias, float32": lambda: F.interpolate(
            t_f32, size=(h, w), mode="bicubic", antialias=True),
        "per-tap gather port (numpy)": lambda: gather_port(img, 0.25),
    }
    times = {}
    for name, fn in contenders.items():
        times[name] = best_time(fn, args.repeats if "gather" not in name else max(2, args.repeats // 5))
    ours_t = times["srmap imresize (MATLAB-exact)"]

    print(f"imresize(uint8 {img.shape[1]}x{img.shape[0]}x3, 1/4) -> {w}x{h}, one thread, best of {args.repeats}")
    print("level differences from ours: max over the image / max away from a 3-pixel border (where PIL and")
    print("torch renormalise a truncated kernel instead of mirroring) / share of values that differ")
    print(f"{'contender':46s} {'ms':>7s} {'ours/this':>9s} {'max':>4s} {'inner':>5s} {'differ':>7s}")
    results = {}
    for name, t in times.items():
        other = outputs.get(name, port if "gather" in name else ours)
        diff = np.abs(other.astype(int) - ours.astype(int))
        row = {"ms": t * 1e3, "ours_over_this": ours_t / t, "max_level_diff": int(diff.max()),
               "max_level_diff_inner": int(diff[3:-3, 3:-3].max()), "fraction_differing": float((diff > 0).mean())}
        results[name] = row
        print(f"{name:46s} {row['ms']:7.2f} {row['ours_over_this']:9.2f} {row['max_level_diff']:4d} "
              f"{row['max_level_diff_inner']:5d} {row['fraction_differing']:7.1%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
