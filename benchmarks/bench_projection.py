"""What the consistency projection costs next to the generator it follows.

On a 2040x1356 output (a DIV2K validation image's size), one thread, median of
interleaved rounds (benchmarks/bench_model.py): one forward of the demo
generator on the 510x339 LR input with noise on (the baseline), against
``srmap.resize.project_consistent`` once (float64 and float32) and
``project_consistent_box`` with its 10 rounds (float64, what `srmap upscale
--consistency project` and `evaluate.consistency: project` run).

    PYTHONPATH=. python benchmarks/bench_projection.py --threads 1     # about 2 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_model import interleaved, load_profile  # noqa: E402
from benchmarks.bench_noise import report  # noqa: E402
from srmap.nets import Generator  # noqa: E402
from srmap.resize import imresize, project_consistent, project_consistent_box  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds; medians are reported")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g_cfg, _, _ = load_profile("demo")
    G = Generator(g_cfg).eval()
    G.set_noise_scales(5.0)
    torch.manual_seed(0)
    hr = torch.rand(1, 3, 1356, 2040, dtype=torch.float64)
    lr = imresize(hr, 0.25)  # (1, 3, 339, 510)
    lr32, hr32 = lr.float(), hr.float()
    x = hr + 0.05 * torch.randn_like(hr)  # an output to project

    def generate():
        with torch.no_grad():
            return G(lr32, seed=0)

    calls = {"demo G forward (510x339 -> 2040x1356)": generate,
             "projection, float64": lambda: project_consistent(x, lr),
             "projection, float32": lambda: project_consistent(x.float(), lr32),
             "box projection (10 rounds), float64": lambda: project_consistent_box(x, lr)}
    generate(), project_consistent(hr32, lr32)  # build the cached projector matrices before timing
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.iters}")
    report("projection of a 2040x1356 output against one demo-G forward", interleaved(calls, args.iters, 1, "cpu"),
           unit=1e3, unit_name="ms")


if __name__ == "__main__":
    main()
