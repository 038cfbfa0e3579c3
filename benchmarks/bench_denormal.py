"""What subnormal floats cost a CPU training step, and what flushing them to zero buys.

The study generator (params.yaml ``study``), batch 16, 48x48 LR patches, one
pretraining step each call: forward, L1 against a fixed random HR batch,
backward, Adam. After three warm-up steps (the zero-initialised output
convolutions have moved off zero and SiLU's tail produces subnormal gradients),
the same model is stepped round-robin with subnormals kept (IEEE, the
baseline) and flushed to zero on every thread (:func:`srmap.train_utils.flush_denormals`),
so both columns see the same load and nearly the same weights.

    PYTHONPATH=. python benchmarks/bench_denormal.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_model import interleaved, load_profile  # noqa: E402
from srmap.nets import BiasedActivation, Generator  # noqa: E402
from srmap.train_utils import flush_denormals  # noqa: E402

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 1.18e-38


def subnormal_share(G: Generator, x: torch.Tensor) -> float:
    """Share of the non-zero input gradients of G's activations that are subnormal, with IEEE arithmetic."""
    flush_denormals(False)
    counts = [0, 0]

    def hook(module, grad_in, grad_out):
        g = grad_in[0]
        if g is not None:
            nz = g[g != 0].abs()
            counts[0] += int((nz < TINY).sum())
            counts[1] += nz.numel()

    handles = [m.register_full_backward_hook(hook) for m in G.modules() if isinstance(m, BiasedActivation)]
    G(x).abs().mean().backward()
    for h in handles:
        h.remove()
    G.zero_grad(set_to_none=True)
    return counts[0] / max(counts[1], 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [all]")
    ap.add_argument("--iters", type=int, default=8, help="timed rounds per mode [8]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen_cfg, _, lr_patch = load_profile("study")
    torch.manual_seed(0)
    G = Generator(gen_cfg).train()
    opt = torch.optim.Adam(G.parameters(), lr=5e-4, betas=(0.9, 0.999))  # the study's pretraining optimiser
    x = torch.rand(16, 3, lr_patch, lr_patch)
    hr = torch.rand(16, 3, 4 * lr_patch, 4 * lr_patch)

    def step() -> None:
        loss = (G(x, noise_scale=0.0) - hr).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def kept() -> None:
        flush_denormals(False)
        step()

    def flushed() -> None:
        flush_denormals(True)
        step()

    for _ in range(3):
        step()
    share = subnormal_share(G, x)
    times = interleaved({"subnormals kept (IEEE)": kept, "subnormals flushed": flushed},
                        iters=args.iters, warmup=1, device="cpu")
    base = statistics.median(times["subnormals kept (IEEE)"])
    print(f"study G pretraining step, batch 16, LR {lr_patch}², {args.threads} thread(s); "
          f"subnormal share of activation input gradients: {share:.2%}")
    print("| mode | median s/step | ratio |\n|---|--:|--:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f}x |")


if __name__ == "__main__":
    main()
