"""What the generator's noise costs, and what torch.compile buys, on this machine.

Three measurements, each a ratio against a baseline timed in the same run,
interleaved round-robin (benchmarks/bench_model.py) so that every ratio
compares calls made under the same load:

1. ``train``: G forward+backward at the study width (params.yaml ``study``),
   batch 16, 48x48 LR patches, L1 against a random HR batch: noise off
   (``noise_scale=0``, the baseline) against the stateless noise of
   :mod:`srmap.noise` with training keys, and against one global
   ``torch.randn`` per injector (the cheapest noise torch offers; reference).
2. ``sample``: a batch-1 sampling forward (no grad) of the paper generator on
   one 48x48 LR patch: noise off (baseline) against the stateless noise and
   ``torch.randn``; then the same forward's 136 noise maps alone, stateless
   against ``torch.randn`` (baseline).
3. ``compile`` (``--compile``): one training step of each stage at the study
   width and batch 16, eager (baseline) against ``torch.compile`` (inductor)
   of G and of the critic's fake passes, as ``srmap.train`` does; the critic's
   R1 pass stays eager. The compile warm-up (first steps) is reported apart.

    PYTHONPATH=. python benchmarks/bench_noise.py --threads 1              # 1 and 2, ~4 min on CPU
    PYTHONPATH=. python benchmarks/bench_noise.py --threads 1 --compile    # + 3, ~20 min on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import srmap.noise  # noqa: E402
from benchmarks.bench_model import interleaved, load_profile, sync  # noqa: E402
from srmap.losses import critic_adv_loss, fidelity_loss, generator_adv_loss, l1_loss, r1_penalty  # noqa: E402
from srmap.nets import Critic, Generator  # noqa: E402
from srmap.noise import training_keys  # noqa: E402


def randn_map(keys32, injector, channels, top, left, height, width):
    """Stand-in for srmap.noise.noise_map: one global torch.randn draw (no reproducibility)."""
    return torch.randn(keys32.shape[0], channels, height, width, device=keys32.device)


def with_randn(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the generator's noise drawn by torch.randn instead of the stateless map."""
    def call():
        with mock.patch.object(srmap.noise, "noise_map", randn_map):
            return fn()
    return call


def report(title: str, times: dict[str, list[float]], unit: float = 1e3, unit_name: str = "ms") -> None:
    """Print medians and ratios against the first entry (the baseline)."""
    base = statistics.median(next(iter(times.values())))
    print(f"\n{title}")
    print(f"| call | median {unit_name} | vs {next(iter(times))} |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * unit:.1f} | {m / base:.2f}x |")


def bench_train(device: str, iters: int) -> None:
    g_cfg, _, _ = load_profile("study")
    G = Generator(g_cfg).to(device).train()
    G.set_noise_scales(0.1)  # nonzero, as after pretraining; the cost does not depend on the value
    y = torch.rand(16, 3, 48, 48, device=device)
    x = torch.rand(16, 3, 192, 192, device=device)
    keys = training_keys(0, torch.arange(16)).to(device)

    def step(noise_scale: float) -> Callable[[], object]:
        def call():
            G.zero_grad(set_to_none=True)
            l1_loss(G(y, seed=keys, noise_scale=noise_scale), x).backward()
        return call

    times = interleaved({"noise off": step(0.0), "stateless noise": step(1.0),
                         "torch.randn noise": with_randn(step(1.0))}, iters, 1, device)
    report(f"1. study G forward+backward, batch 16, LR 48x48 ({device})", times)


def bench_sample(device: str, iters: int) -> None:
    g_cfg, _, _ = load_profile("paper")
    G = Generator(g_cfg).to(device).eval()
    G.set_noise_scales(0.1)
    y = torch.rand(1, 3, 48, 48, device=device)

    def fwd(noise_scale: float) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return G(y, seed=0, noise_scale=noise_scale)
        return call

    times = interleaved({"noise off": fwd(0.0), "stateless noise": fwd(1.0),
                         "torch.randn noise": with_randn(fwd(1.0))}, iters, 1, device)
    report(f"2. paper G sampling forward, batch 1, LR 48x48 ({device})", times)

    # The maps alone: every injector's map of that forward, made outside the network.
    shapes = []

    def record(keys32, injector, channels, top, left, height, width):
        shapes.append((injector, channels, height, width))
        return randn_map(keys32, injector, channels, top, left, height, width)

    with mock.patch.object(srmap.noise, "noise_map", record):
        fwd(1.0)()
    keys32 = srmap.noise.fold_keys(torch.zeros(1, dtype=torch.int64, device=device))
    values = sum(c * h * w for _, c, h, w in shapes)

    def maps(make):
        return lambda: [make(keys32, i, c, 0, 0, h, w) for i, c, h, w in shapes]

    times = interleaved({"torch.randn maps": maps(randn_map), "stateless maps": maps(srmap.noise.noise_map)},
                        iters, 1, device)
    report(f"2b. the {len(shapes)} noise maps of that forward alone ({values / 1e6:.1f}M values)", times)


def stage_steps(device: str, compile: bool) -> dict[str, Callable[[], object]]:
    """One pretrain step and one GAN step (critic half, then G half) of the study networks, as srmap.train."""
    g_cfg, c_cfg, patch = load_profile("study")
    torch.manual_seed(0)
    G = Generator(g_cfg).to(device).train()
    G.set_noise_scales(0.1)
    D = Critic(c_cfg).to(device).train()
    G_run = torch.compile(G, dynamic=False) if compile else G
    D_run = torch.compile(D, dynamic=False) if compile else D
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-4), torch.optim.Adam(D.parameters(), 1e-4)
    y = torch.rand(16, 3, patch, patch, device=device)
    x = torch.rand(16, 3, 4 * patch, 4 * patch, device=device)
    keys = training_keys(0, torch.arange(16)).to(device)

    def pretrain():
        opt_g.zero_grad(set_to_none=True)
        l1_loss(G_run(y, seed=keys), x).backward()
        opt_g.step()

    def gan():
        D.requires_grad_(True)
        with torch.no_grad():
            fake = G_run(y[:8], seed=keys[:8])
        x_in = x[:8].detach().requires_grad_(True)
        c_real = D(x_in)  # eager: R1 needs its double backward
        loss_d = critic_adv_loss(c_real, D_run(fake)) + 0.5 * r1_penalty(c_real, x_in)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        sr = G_run(y[8:], seed=keys[8:])
        with torch.no_grad():
            c_real = D_run(x[8:])
        loss_g = 1e-2 * fidelity_loss(y[8:], sr) + generator_adv_loss(D_run(sr), c_real)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    return {"pretrain": pretrain, "train_gan": gan}


def bench_compile(device: str, iters: int) -> None:
    eager, compiled = stage_steps(device, False), stage_steps(device, True)
    for stage in ("pretrain", "train_gan"):
        start = time.perf_counter()
        for _ in range(2):  # the first call compiles; the second shows there is no recompilation left
            compiled[stage]()
        sync(device)
        warmup = time.perf_counter() - start
        times = interleaved({"eager": eager[stage], "compiled": compiled[stage]}, iters, 1, device)
        report(f"3. {stage} step, study networks, batch 16 ({device}); compile warm-up {warmup:.0f} s", times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--iters", type=int, default=6, help="timed rounds per measurement; medians are reported")
    p.add_argument("--compile", action="store_true", help="also time compiled against eager training steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), "
          f"median of {args.iters}")
    bench_train(args.device, args.iters)
    bench_sample(args.device, args.iters)
    if args.compile:
        bench_compile(args.device, args.iters)


if __name__ == "__main__":
    main()
