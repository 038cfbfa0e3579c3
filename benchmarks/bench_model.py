"""Speed of the SRMAP generator and critic at the training patch size.

For each configuration (params.yaml profiles) it times forward (no grad) and
forward+backward of G and D, and prints patches/s, forward FLOPs per patch and
the achieved FLOP/s (forward+backward counted as 3x forward). Every number is
set against a baseline timed in the same run: a dense matmul of the same dtype
(the ratio is a model-FLOPs utilisation against what this machine delivers),
and on CPU fp32 contiguous vs channels_last.

    python benchmarks/bench_model.py --threads 1              # CPU, demo + paper, ~2 min
    python benchmarks/bench_model.py --device cuda            # bf16 autocast + channels_last, MFU,
                                                              # and one paper training step at 32+32
    python benchmarks/bench_model.py --device cuda --compile  # same under torch.compile

The training step uses stand-in losses of the right cost (L1 fidelity through an
antialiased bicubic x1/4, relativistic softplus, R1 by double backward); the
project's own losses live in the training code.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srmap.config import load_params  # noqa: E402
from srmap.nets import Critic, Generator, count_params, flops_per_patch  # noqa: E402
from srmap.options import CriticConfig, GeneratorConfig  # noqa: E402
from srmap.utils import project_root  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """One way of running the nets."""

    name: str  # label in the table
    channels_last: bool  # NHWC memory format for weights and inputs
    bf16: bool  # bf16 autocast (CUDA only)
    compile: bool  # torch.compile the modules


def load_profile(name: str) -> tuple[GeneratorConfig, CriticConfig, int]:
    """(generator config, critic config, LR training patch) of a params.yaml profile."""
    _, section = load_params(project_root() / "params.yaml", name)
    model = section["model"]
    return (GeneratorConfig(**model["generator"]), CriticConfig(**model["critic"]),
            int(section["train_gan"]["lr_patch"]))


def sync(device: str) -> None:
    """Wait for queued device work so wall-clock timing is honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], iters: int, warmup: int, device: str) -> float:
    """Median wall-clock seconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed calls."""
    return statistics.median(interleaved({"fn": fn}, iters, warmup, device)["fn"])


def interleaved(calls: dict[str, Callable[[], object]], iters: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, timed round-robin: ``iters`` rounds after ``warmup`` rounds.

    Round-robin rather than one call after another: on a shared machine the load
    drifts, and interleaving makes every ratio compare calls made under the same
    load (the baseline included). Report medians: one stalled call says nothing.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + iters):
        for name, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def matmul_call(device: str, dtype: torch.dtype, n: int) -> tuple[Callable[[], object], int]:
    """(an n x n x n matmul in ``dtype``, its FLOPs): the dense peak baseline."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def autocast(device: str, mode: Mode):
    """bf16 autocast context for ``mode`` on CUDA, else a no-op."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if mode.bf16 and device == "cuda" else nullcontext()


def prepare(net: torch.nn.Module, x: torch.Tensor, mode: Mode):
    """(callable net, input) in the memory format of ``mode``."""
    if mode.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return (torch.compile(net) if mode.compile else net), x


def mode_calls(net: torch.nn.Module, x: torch.Tensor, device: str, modes: list[Mode]):
    """Per mode: (forward-only call, forward+backward call) on its own copy of ``net``."""
    out = {}
    for mode in modes:
        run, xm = prepare(copy.deepcopy(net), x, mode)

        def fwd(run=run, xm=xm, mode=mode):
            with torch.no_grad(), autocast(device, mode):
                run(xm)

        def fwd_bwd(run=run, xm=xm, mode=mode):
            with autocast(device, mode):
                out = run(xm)
            out.float().mean().backward()  # grads accumulate; harmless for timing

        out[mode.name] = (fwd, fwd_bwd)
    return out


def train_step_seconds(g: Generator, d: Critic, lr_patch: int, batch: int, device: str, mode: Mode,
                       iters: int, warmup: int) -> float:
    """Seconds of one GAN step: G on ``batch`` LR patches, the critic on those fakes and ``batch`` reals."""
    hr = 4 * lr_patch
    y = torch.rand(batch, 3, lr_patch, lr_patch, device=device)
    x = torch.rand(batch, 3, hr, hr, device=device)
    run_g, y = prepare(g, y, mode)
    run_d, x = prepare(d, x, mode)
    # Double backward (R1) is not supported through compiled graphs: that pass runs eagerly.
    r1_d = d
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-4, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.0, 0.99))
    alpha, gamma = 50.0, 1.0

    def step():
        with autocast(device, mode):
            fake = run_g(y)
            down = F.interpolate(fake.float(), scale_factor=0.25, mode="bicubic", antialias=True,
                                 align_corners=False)
            fidelity = (down - y).abs().mean()
            adv = F.softplus(-(run_d(fake) - run_d(x))).mean()
        opt_g.zero_grad(set_to_none=True)
        (alpha * fidelity + adv.float()).backward()
        opt_g.step()

        real = x.detach().requires_grad_(True)
        with autocast(device, mode):
            real_score = r1_d(real)
            critic = F.softplus(-(real_score - run_d(fake.detach()))).mean()
        (grad,) = torch.autograd.grad(real_score.float().sum(), real, create_graph=True)
        r1 = grad.float().square().sum(dim=(1, 2, 3)).mean()
        opt_d.zero_grad(set_to_none=True)
        (critic.float() + 0.5 * gamma * r1).backward()
        opt_d.step()

    return seconds_per_call(step, iters, warmup, device)


def fmt_rate(flops: float) -> str:
    """FLOP/s in G or T units."""
    return f"{flops / 1e12:.2f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--configs", default="demo,paper", help="comma-separated params.yaml profiles")
    p.add_argument("--batch", type=int, default=None,
                   help="patches per timed call (default: CPU demo 8 / paper 1; CUDA 32)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per measurement, median reported (default: CPU demo 5 / paper 2; CUDA 20)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 gives steadier numbers on a busy machine")
    p.add_argument("--compile", action="store_true", help="CUDA: also torch.compile the nets")
    p.add_argument("--no-train-step", action="store_true", help="CUDA: skip the full paper training step")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    for name in ("batch", "iters", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name}: expected a positive integer, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one table per configuration."""
    args = parse_args(argv)
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
        modes = [Mode("fp32", False, False, False), Mode("bf16+NHWC", True, True, False)]
        if args.compile:
            modes.append(Mode("bf16+NHWC+compile", True, True, True))
        mm, mm_flops = matmul_call(dev, torch.bfloat16, 8192)
        mm_name = "bf16 matmul 8192^3"
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    else:
        modes = [Mode("fp32", False, False, False), Mode("fp32+NHWC", True, False, False)]
        mm, mm_flops = matmul_call(dev, torch.float32, 1024)
        mm_name = "fp32 matmul 1024^3"
        print(f"device: CPU, {torch.get_num_threads()} threads  torch {torch.__version__}")
    print(f"MFU = achieved FLOP/s / FLOP/s of a {mm_name} timed in the same rounds; "
          f"'vs {modes[0].name}' = median per-round speed-up of forward+backward")

    for profile in [c.strip() for c in args.configs.split(",") if c.strip()]:
        g_cfg, d_cfg, lr_patch = load_profile(profile)
        hr = 4 * lr_patch
        small = profile == "demo" or dev == "cuda"
        batch = args.batch or (32 if dev == "cuda" else 8 if small else 1)
        iters = args.iters or (20 if dev == "cuda" else 5 if small else 2)
        g = Generator(g_cfg).to(dev)
        d = Critic(d_cfg).to(dev)
        nets = [("G", g, (3, lr_patch, lr_patch)), ("D", d, (3, d_cfg.in_size, d_cfg.in_size))]
        print(f"\n[{profile}] LR {lr_patch} -> HR {hr}, batch {batch}, {iters} rounds"
              f" | G {count_params(g):,} params | D {count_params(d):,} params")
        print(f"{'net':3} {'mode':18} {'FLOP/patch':>11} {'fwd patch/s':>12} {'fwd FLOP/s':>15} {'MFU':>6}"
              f" {'train patch/s':>14} {'train FLOP/s':>15} {'MFU':>6} {'vs ' + modes[0].name:>9}")
        peak = 0.0
        fwd_per_patch = {}
        for name, net, shape in nets:
            flops = flops_per_patch(net, shape)
            calls = mode_calls(net, torch.rand((batch, *shape), device=dev), dev, modes)
            fwd = interleaved({"mm": mm, **{m: c[0] for m, c in calls.items()}}, iters, args.warmup, dev)
            train = interleaved({"mm": mm, **{m: c[1] for m, c in calls.items()}}, iters, args.warmup, dev)
            peak_fwd = mm_flops / statistics.median(fwd["mm"])
            peak_train = mm_flops / statistics.median(train["mm"])
            peak = max(peak, peak_fwd, peak_train)
            base = train[modes[0].name]
            for mode in modes:
                t_fwd, t_train = statistics.median(fwd[mode.name]), statistics.median(train[mode.name])
                fwd_rate, train_rate = flops * batch / t_fwd, 3 * flops * batch / t_train
                speedup = statistics.median(b / t for b, t in zip(base, train[mode.name]))
                fwd_per_patch.setdefault(name, t_fwd / batch)
                print(f"{name:3} {mode.name:18} {flops / 1e9:9.3f} G {batch / t_fwd:12.2f} {fmt_rate(fwd_rate):>15}"
                      f" {fwd_rate / peak_fwd:6.1%} {batch / t_train:14.2f} {fmt_rate(train_rate):>15}"
                      f" {train_rate / peak_train:6.1%} {speedup:8.2f}x")
        print(f"baseline {mm_name}: {fmt_rate(peak)} (best of the rounds above)")
        y1 = torch.rand(1, 3, lr_patch, lr_patch, device=dev)
        noise = interleaved({"hash": lambda: g(y1, seed=0), "randn": lambda: g(y1)},
                            max(iters, 5), 1, dev)
        t_hash, t_randn = statistics.median(noise["hash"]), statistics.median(noise["randn"])
        print(f"noise maps for one {lr_patch}x{lr_patch} patch, {len(g.injectors())} injectors (whole forward): "
              f"hash {t_hash * 1e3:.2f} ms, "
              f"randn {t_randn * 1e3:.2f} ms ({t_hash / t_randn:.1f}x randn, "
              f"{t_hash / fwd_per_patch['G']:.2%} of a {modes[0].name} G forward per patch)")
        if dev == "cuda" and profile == "paper" and not args.no_train_step:
            step_batch = 32
            g_flops = flops_per_patch(g, (3, lr_patch, lr_patch))
            d_flops = flops_per_patch(d, (3, hr, hr))
            for mode in modes[1:]:
                t = train_step_seconds(g, d, lr_patch, step_batch, dev, mode, max(3, iters // 4), 2)
                # G fwd+bwd (3x); D: fake+real fwd+bwd in the G step (6x), fake in the D step (3x),
                # real with R1's double backward (~6x) -> roughly 3 G + 18 D forwards per patch.
                step_flops = step_batch * (3 * g_flops + 3 * d_flops * 6)
                print(f"paper training step {step_batch}+{step_batch} [{mode.name}]: {t * 1e3:.1f} ms/step, "
                      f"{1 / t:.2f} steps/s, ~{fmt_rate(step_flops / t)} (MFU ~{step_flops / t / peak:.1%}, "
                      f"FLOPs estimated)")


if __name__ == "__main__":
    main()
