"""Benchmark: peak memory of upscaling a 510x339 LR image to 2040x1356, whole image vs tiled.

Each mode runs in its own subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), plus the RSS right before
inference (torch, the generator and the input loaded), so the inference's own
share is visible. The generator is the demo profile's (params.yaml ``demo``),
randomly initialised: memory depends on the architecture, not the weights.
The outputs of all modes are compared with the whole-image output.

    PYTHONPATH=. python benchmarks/bench_upscale.py
    PYTHONPATH=. python benchmarks/bench_upscale.py --profile paper --tiles 128   # big model: long on a CPU
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


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(profile: str, tile: int, out: Path, height: int, width: int) -> None:
    """Upscale one synthetic LR image in this process; print a JSON line with timings and memory."""
    import torch
    import yaml

    from srmap.inference import upscale_image
    from srmap.nets import Generator, generator_config

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    torch.manual_seed(0)
    G = Generator(generator_config(params[profile]["model"]["generator"])).eval()
    lr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    before = _rss_mb()
    t0 = time.perf_counter()
    sr = upscale_image(G, lr, seed=0, noise_scale=1.0, tile=tile, tile_pad=G.receptive_radius, device="cpu")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    np.save(out, sr)
    print(json.dumps({"tile": tile, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak,
                      "tile_pad": G.receptive_radius, "shape": list(sr.shape)}))


def main(argv=None) -> int:
    """Run every mode in a subprocess and print peak memory and time against the whole-image baseline."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo", help="params.yaml profile whose generator to use")
    ap.add_argument("--tiles", type=int, nargs="*", default=[256, 128, 64], help="tile sizes (LR px) besides 0")
    ap.add_argument("--height", type=int, default=339)
    ap.add_argument("--width", type=int, default=510)
    ap.add_argument("--child-tile", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_tile is not None:
        child(args.profile, args.child_tile, args.child_out, args.height, args.width)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tile in [0] + args.tiles:
            out = Path(tmp) / f"sr_{tile}.npy"
            proc = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--height", str(args.height),
                                   "--width", str(args.width), "--child-tile", str(tile), "--child-out", str(out)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["sr"] = np.load(out)
            rows.append(row)
    base = rows[0]
    h, w = base["shape"][:2]
    print(f"profile {args.profile}, LR {args.width}x{args.height} -> SR {w}x{h}, tile_pad {base['tile_pad']} "
          "(= receptive radius)")
    print(f"{'mode':>12s} {'peak MiB':>9s} {'vs whole':>9s} {'inference MiB':>14s} {'vs whole':>9s} "
          f"{'seconds':>8s} {'max |diff|':>10s}")
    for r in rows:
        extra, base_extra = r["peak_mb"] - r["rss_before_mb"], base["peak_mb"] - base["rss_before_mb"]
        diff = int(np.abs(r["sr"].astype(int) - base["sr"].astype(int)).max())
        name = "whole image" if r["tile"] == 0 else f"tile {r['tile']}"
        print(f"{name:>12s} {r['peak_mb']:9.0f} {r['peak_mb'] / base['peak_mb']:8.2f}x {extra:14.0f} "
              f"{extra / base_extra:8.2f}x {r['seconds']:8.2f} {diff:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
