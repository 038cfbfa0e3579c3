"""Benchmark: peak memory of x4 upscaling, whole image vs a fixed tile, at two image sizes.

Each (size, mode) runs in its own subprocess. Before inference (torch, the
generator and the input loaded, one small warm-up call made) the process
resets its peak RSS (``/proc/self/clear_refs``; else ``ru_maxrss`` is used);
"inference MiB" is the peak during ``upscale_image`` minus the RSS before it.
With a tile, what inference needs beyond the uint8 output buffer should not
grow with the image. The generator is the demo profile's (params.yaml
``demo``), randomly initialised: memory depends on the architecture, not the
weights. Outputs of every mode are compared with the whole-image output.

    PYTHONPATH=. python benchmarks/bench_upscale.py
    PYTHONPATH=. python benchmarks/bench_upscale.py --sizes 339x510 678x1020 --tile 128
    PYTHONPATH=. python benchmarks/bench_upscale.py --profile paper --tile 128   # big model: long on a CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(profile: str, tile: int, out: Path, height: int, width: int) -> None:
    """Upscale one synthetic LR image in this process; print a JSON line with timings and memory."""
    import torch
    import yaml

    from srmap.inference import upscale_image
    from srmap.nets import Generator
    from srmap.options import GeneratorConfig

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(**params[profile]["model"]["generator"])).eval()
    pad = G.receptive_radius
    upscale_image(G, np.zeros((24, 24, 3), np.uint8), seed=0, noise_scale=1.0, tile=tile, tile_pad=pad, device="cpu")
    lr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    reset = _reset_peak()
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    sr = upscale_image(G, lr, seed=0, noise_scale=1.0, tile=tile, tile_pad=pad, device="cpu")
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out, sr)
    print(json.dumps({"tile": tile, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak,
                      "output_mb": sr.nbytes / 2**20, "tile_pad": pad, "shape": list(sr.shape),
                      "peak_reset": reset}))


def main(argv=None) -> int:
    """Run every (size, mode) in a subprocess; print inference memory against the whole-image baseline."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo", help="params.yaml profile whose generator to use")
    ap.add_argument("--sizes", nargs="*", default=["339x510", "678x1020"], help="LR sizes HxW")
    ap.add_argument("--tile", type=int, default=128, help="the fixed LR tile size")
    ap.add_argument("--height", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-tile", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_tile is not None:
        child(args.profile, args.child_tile, args.child_out, args.height, args.width)
        return 0

    print(f"profile {args.profile}, tile {args.tile}, tile_pad = receptive radius; inference = peak - RSS before")
    print(f"{'LR':>9s} {'SR':>10s} {'mode':>11s} {'inference MiB':>14s} {'vs whole':>9s} {'output MiB':>11s} "
          f"{'beyond output':>14s} {'seconds':>8s} {'max |diff|':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            rows = []
            for tile in (0, args.tile):
                out = Path(tmp) / f"sr_{tile}.npy"
                proc = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--height", str(h),
                                       "--width", str(w), "--child-tile", str(tile), "--child-out", str(out)],
                                      capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["sr"] = np.load(out)
                rows.append(row)
            base_extra = rows[0]["peak_mb"] - rows[0]["rss_before_mb"]
            for r in rows:
                extra = r["peak_mb"] - r["rss_before_mb"]
                diff = int(np.abs(r["sr"].astype(int) - rows[0]["sr"].astype(int)).max())
                name = "whole image" if r["tile"] == 0 else f"tile {r['tile']}"
                sh, sw = r["shape"][:2]
                print(f"{w:>4d}x{h:<4d} {sw:>5d}x{sh:<5d} {name:>11s} {extra:14.0f} {extra / base_extra:8.2f}x "
                      f"{r['output_mb']:11.1f} {extra - r['output_mb']:14.0f} {r['seconds']:8.2f} {diff:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
