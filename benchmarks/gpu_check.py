"""One prepared GPU check of SRMAP's CUDA path: speed, memory and a short real training run.

    python benchmarks/gpu_check.py                      # one H100/H200: < 8 min, writes gpu_check.json

This file only measures. Its CPU test, tests/test_gpu_check.py, calls
:func:`run_checks` in-process with tiny networks and shapes and checks that
every JSON key is written and every item is sane.

Items (JSON key: what):

* ``matmul``: bf16 8192^3 matmul FLOP/s, the MFU baseline, timed in the same run.
* ``generator``: the paper-config generator's forward+backward at 32 LR patches of
  48 px (bf16 autocast, channels_last, per-sample noise streams), eager and
  ``torch.compile``: steps/s, patches/s, MFU, peak memory.
* ``gan_step``: the real ``srmap.train.train_gan`` loop at batch 64 = 32 + 32
  (G step, critic step with R1, EMA update, loss all-reduce and skip guard),
  eager and compiled G: steps/s from the loop's own step timer, MFU, peak memory.
* ``noise``: the stateless noise's share of a generator forward (srmap.noise,
  the one noise of training and sampling), against the same forward with the
  noise off; ``torch.randn`` noise of the same shapes is timed as a reference.
* ``upscale``: a 510x339 -> 2040x1356 output, whole and tiled (the paper
  profile's tile / tile_pad): seconds, peak memory, max difference.
* ``ntire``: NTIRE 2021 scoring (LPIPS, LR-PSNR, diversity, PSNR/SSIM) of one
  2040x1356 image with 10 samples, LPIPS on the GPU. Without the pretrained
  AlexNet weights it falls back to the untrained backbone and says so.
* ``training``: 300 steps of the paper-config ``train_gan`` on random crops of
  the demo's images (shipped inside scikit-image, no download): every loss finite.

FLOPs are counted as ``srmap info`` counts them (torch.utils.flop_counter over
convolutions and matmuls): the generator's forward+backward as 3x its forward,
the GAN step as 4 x 32 generator and 12 x 32 critic forwards (gan_step_flops
explains the count). MFU = achieved FLOP/s / the bf16 matmul's FLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import interleaved, matmul_call, sync  # noqa: E402
from srmap.config import load_params  # noqa: E402
from srmap.nets import Generator, flops_per_patch  # noqa: E402
from srmap.options import CriticConfig, GeneratorConfig  # noqa: E402
from srmap.utils import atomic_write_json, project_root  # noqa: E402

KEYS = ("meta", "matmul", "generator", "gan_step", "noise", "upscale", "ntire", "training")


@dataclass(frozen=True)
class Shapes:
    """Sizes of one check run (FULL on a GPU; the CPU test passes tiny ones)."""

    matmul: int  # n of the n^3 bf16 matmul
    half: int  # patches per batch half (G's forward+backward batch; the GAN batch is 2 x half)
    iters: int  # timed rounds per micro-benchmark (median reported)
    warmup: int  # untimed rounds first (compilation happens here)
    gan_steps: int  # steps of each timed train_gan run (eager / compiled)
    log_every: int  # train_gan's timing window (first window = warm-up, not used)
    gt_size: tuple[int, int]  # (width, height) of the HR image for upscale / NTIRE
    samples: int  # NTIRE samples
    train_steps: int  # steps of the training item
    workers: int  # DataLoader workers


FULL = Shapes(matmul=8192, half=32, iters=10, warmup=3, gan_steps=60, log_every=20, gt_size=(2040, 1356), samples=10,
              train_steps=300, workers=8)


class StepTimer:
    """Stands in for the MLflow tracker of ``train_gan``: keeps the loop's own per-window step times."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Record one window's metrics (the loop logs step_time_s every log_every steps)."""
        self.rows.append({"step": step, **metrics})

    def log_artifact(self, path, folder=None) -> None:
        """Artifacts are not kept."""


def autocast(device: torch.device):
    """bf16 autocast on ``device`` (CPU too: the CPU test takes the same path)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def peak_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_matmul(device: torch.device, s: Shapes) -> dict:
    """bf16 n^3 matmul FLOP/s (median of ``s.iters`` after warm-up)."""
    fn, flops = matmul_call(device.type, torch.bfloat16, s.matmul)
    t = statistics.median(interleaved({"mm": fn}, max(s.iters, 5), s.warmup, device.type)["mm"])
    return {"n": s.matmul, "seconds": t, "tflops": flops / t / 1e12}


def check_generator(device: torch.device, g_cfg, lr_patch: int, s: Shapes, peak_tflops: float) -> dict:
    """Generator forward+backward at ``s.half`` patches, bf16 + channels_last, eager vs compiled."""
    torch.manual_seed(0)
    base = Generator(g_cfg).to(device).to(memory_format=torch.channels_last)
    base.set_noise_scales(1.0)
    y = torch.rand(s.half, 3, lr_patch, lr_patch, device=device).contiguous(memory_format=torch.channels_last)
    flops = 3 * flops_per_patch(base, (3, lr_patch, lr_patch)) * s.half
    out = {"batch": s.half, "lr_patch": lr_patch, "flops_per_step": flops}
    for name in ("eager", "compiled"):
        net = copy.deepcopy(base)
        run = torch.compile(net) if name == "compiled" else net
        keys = torch.arange(s.half, device=device)  # per-sample noise keys, as training passes them

        def step(run=run, keys=keys):
            with autocast(device):
                sr = run(y, seed=keys)
            sr.float().mean().backward()

        reset_peak(device)
        t0 = time.perf_counter()
        step()
        sync(device.type)
        first = time.perf_counter() - t0
        t = statistics.median(interleaved({"step": step}, s.iters, s.warmup, device.type)["step"])
        out[name] = {"steps_per_s": 1 / t, "patches_per_s": s.half / t, "tflops": flops / t / 1e12,
                     "mfu": flops / t / 1e12 / peak_tflops, "first_call_s": first, "peak_mem_gib": peak_gib(device)}
        del net, run
    out["compiled_vs_eager"] = out["compiled"]["steps_per_s"] / out["eager"]["steps_per_s"]
    return out


def check_noise(device: torch.device, g_cfg, lr_patch: int, s: Shapes) -> dict:
    """Share of a no-grad bf16 generator forward spent on the stateless noise; ``torch.randn`` as a reference."""
    torch.manual_seed(0)
    G = Generator(g_cfg).to(device).to(memory_format=torch.channels_last).eval()
    G.set_noise_scales(1.0)
    y = torch.rand(s.half, 3, lr_patch, lr_patch, device=device).contiguous(memory_format=torch.channels_last)

    def fwd(**kw):
        def call():
            with torch.no_grad(), autocast(device):
                G(y, **kw)
        return call

    def randn_noise():  # the same forward with torch.randn in place of the bank lookups (reference only)
        from srmap import noise

        real = noise.noise_map
        noise.noise_map = lambda keys, injector, c, top, left, h, w: torch.randn(
            len(keys), c, h, w, device=keys.device)
        try:
            fwd(seed=0)()
        finally:
            noise.noise_map = real

    times = interleaved({"off": fwd(noise_scale=0.0), "stateless": fwd(seed=0), "randn": randn_noise},
                        s.iters, s.warmup, device.type)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": s.half, "injectors": len(G.injectors()), "forward_no_noise_s": med["off"],
            "forward_noise_s": med["stateless"], "forward_randn_s": med["randn"],
            "noise_share": 1 - med["off"] / med["stateless"], "randn_share": 1 - med["off"] / med["randn"]}


def make_gt(size: tuple[int, int]) -> np.ndarray:
    """A uint8 HxWx3 HR test image of ``size`` (width, height): the demo's 'coffee' image resized."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize(size, Image.BICUBIC))


def check_upscale(device: torch.device, G: Generator, lr: torch.Tensor, tile: int, tile_pad: int, s: Shapes) -> dict:
    """Whole vs tiled upscaling of one LR image (float32, noise on, seed 0)."""
    from srmap.inference import upscale_tensor

    out: dict = {"lr_size": [int(lr.shape[-1]), int(lr.shape[-2])], "tile": tile, "tile_pad": tile_pad}
    results = {}
    for name, t in (("whole", 0), ("tiled", tile)):
        reset_peak(device)
        call = lambda t=t: upscale_tensor(G, lr, seed=0, tile=t, tile_pad=tile_pad)  # noqa: E731
        results[name] = call()
        secs = statistics.median(interleaved({"c": call}, 2, 0, device.type)["c"])
        out[name] = {"seconds": secs, "peak_mem_gib": peak_gib(device)}
    diff = (results["whole"] - results["tiled"]).abs().max().item()
    out["sr_size"] = [int(results["whole"].shape[-1]), int(results["whole"].shape[-2])]
    out["max_abs_diff"] = diff
    out["max_diff_uint8_levels"] = int(((results["whole"].clamp(0, 1) * 255).round()
                                        - (results["tiled"].clamp(0, 1) * 255).round()).abs().max().item())
    return out


def check_ntire(device: torch.device, G: Generator, lr: torch.Tensor, gt: np.ndarray, tile: int, tile_pad: int,
                s: Shapes) -> dict:
    """NTIRE 2021 + PSNR/SSIM scoring of one image with ``s.samples`` samples; LPIPS on ``device``."""
    from srmap.evaluate import score_image
    from srmap.inference import upscale_tensor
    from srmap.metrics import LPIPS

    t0 = time.perf_counter()
    samples = []
    for seed in range(s.samples):
        sr = upscale_tensor(G, lr, seed=seed, tile=tile, tile_pad=tile_pad)
        samples.append((sr[0].clamp(0, 1) * 255).round().permute(1, 2, 0).to("cpu", torch.uint8).numpy())
    sync(device.type)
    gen_s = time.perf_counter() - t0
    try:
        lpips = LPIPS(pretrained=True, device=str(device))
    except FileNotFoundError as e:
        print(f"ntire: {e}; timing with the untrained backbone instead", file=sys.stderr)
        lpips = LPIPS(pretrained=False, device=str(device))
    score_image(gt, samples[:1], lpips)  # warm-up (cuDNN autotuning, first allocations)
    t0 = time.perf_counter()
    scores = score_image(gt, samples, lpips)
    sync(device.type)
    return {"samples": s.samples, "generate_s": gen_s, "score_s": time.perf_counter() - t0,
            "lpips_pretrained": lpips.pretrained, "lpips_weights": lpips.weights, "scores": scores}


def prepare_data(root: Path, names: list[str], scale: int) -> Path:
    """The demo's training images (bundled with scikit-image) as a prepared training folder under ``root``."""
    from srmap.prepare import degrade_split, fetch_skimage

    fetch_skimage(names, root / "hr_png", multiple=scale)
    degrade_split(root / "hr_png", root / "train", scale=scale, fmt="npy", workers=1, max_pixels=40_000_000,
                  progress=False)
    return root / "train"


def gan_kwargs(section: dict, s: Shapes, steps: int, compile: bool, device: torch.device) -> dict:
    """The profile's train_gan keywords for a short timed run."""
    kw = {k: v for k, v in section.items()}
    kw.update(batch_size=2 * s.half, epochs=1, iters_per_epoch=steps, milestones=[], image_every=10**9,
              ckpt_every=10**9, log_every=s.log_every, workers=s.workers, compile=compile, device=str(device),
              amp=True, channels_last=True)
    return kw


def run_gan(data: Path, work: Path, init: Path, g_cfg, c_cfg, kw: dict) -> StepTimer:
    """One train_gan run in a fresh folder; returns its per-window timings."""
    from srmap.options import GanOptions
    from srmap.train import train_gan

    timer = StepTimer()
    opts = {k: v for k, v in kw.items() if k != "device"}
    train_gan(GanOptions(**opts), data_dir=data, out_dir=work, init_generator=init, gen_cfg=g_cfg, critic_cfg=c_cfg,
              device=kw["device"], tracker=timer)
    return timer


def gan_step_flops(g_cfg, c_cfg, lr_patch: int, half: int) -> int:
    """Model FLOPs of one GAN step at ``half`` + ``half`` patches, from the forward counts of ``srmap info``.

    With the usual accounting (a backward pass = 2 forwards; a gradient w.r.t.
    the input alone = 1 forward): G makes the critic half's fakes (1 forward)
    and trains on its own half (3); the critic step runs reals and fakes
    forward and backward (2 x 3) plus R1, whose input gradient is 1 forward and
    whose backward 2 more (3); the G step runs the frozen critic on the fakes
    with an input gradient (2) and on the reals without one (1).
    So 4 x half x G + 12 x half x D forward FLOPs.
    """
    from srmap.nets import Critic

    with torch.device("meta"):
        g, d = Generator(g_cfg), Critic(c_cfg)
    g_f = flops_per_patch(g, (3, lr_patch, lr_patch))
    d_f = flops_per_patch(d, (3, c_cfg.in_size, c_cfg.in_size))
    return 4 * half * g_f + 12 * half * d_f


def check_gan_step(device: torch.device, data: Path, tmp: Path, init: Path, g_cfg, c_cfg, section: dict, s: Shapes,
                   peak_tflops: float) -> dict:
    """The train_gan loop's steps/s and MFU at batch 2 x half, eager and with G compiled."""
    flops = gan_step_flops(g_cfg, c_cfg, int(section["lr_patch"]), s.half)
    out: dict = {"batch": 2 * s.half, "flops_per_step": flops}
    for name, comp in (("eager", False), ("compiled", True)):
        reset_peak(device)
        t0 = time.perf_counter()
        timer = run_gan(data, tmp / f"gan_{name}", init, g_cfg, c_cfg, gan_kwargs(section, s, s.gan_steps, comp,
                                                                                    device))
        wall = time.perf_counter() - t0
        windows = [r["step_time_s"] for r in timer.rows[1:]] or [r["step_time_s"] for r in timer.rows]
        t = statistics.median(windows)
        out[name] = {"steps_per_s": 1 / t, "patches_per_s": 2 * s.half / t, "tflops": flops / t / 1e12,
                     "mfu": flops / t / 1e12 / peak_tflops, "run_s": wall, "peak_mem_gib": peak_gib(device)}
    out["compiled_vs_eager"] = out["compiled"]["steps_per_s"] / out["eager"]["steps_per_s"]
    return out


def check_training(device: torch.device, data: Path, tmp: Path, init: Path, g_cfg, c_cfg, section: dict,
                   s: Shapes) -> dict:
    """``s.train_steps`` steps of the profile's train_gan on the demo images; every logged loss must be finite."""
    import csv

    kw = gan_kwargs(section, s, s.train_steps, bool(section["compile"]), device)
    kw.update(log_every=1, image_every=max(s.train_steps // 3, 1))
    t0 = time.perf_counter()
    run_gan(data, tmp / "train", init, g_cfg, c_cfg, kw)
    secs = time.perf_counter() - t0
    with open(tmp / "train" / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = ("fidelity", "generator", "critic", "r1")
    finite = all(math.isfinite(float(r[k])) for r in rows for k in keys)
    skipped = sum(int(r["skipped"]) for r in rows)
    return {"steps": len(rows), "seconds": secs, "all_finite": finite, "skipped_steps": skipped,
            "first": {k: float(rows[0][k]) for k in keys}, "last": {k: float(rows[-1][k]) for k in keys},
            "ok": finite and skipped == 0 and len(rows) == s.train_steps}


def table(result: dict) -> str:
    """The printed summary."""
    r = result
    lines = [f"{'item':44s} value", "-" * 80,
             f"{'bf16 matmul ' + str(r['matmul']['n']) + '^3':44s} {r['matmul']['tflops']:.1f} TFLOP/s"]
    for key, label in (("generator", "G fwd+bwd"), ("gan_step", "GAN step")):
        for mode in ("eager", "compiled"):
            m = r[key][mode]
            mem = f", peak {m['peak_mem_gib']:.1f} GiB" if m["peak_mem_gib"] is not None else ""
            lines.append(f"{label + ' batch ' + str(r[key]['batch']) + ', ' + mode:44s} "
                         f"{m['steps_per_s']:.2f} step/s, {m['tflops']:.1f} TFLOP/s, MFU {100 * m['mfu']:.1f}%{mem}")
    n = r["noise"]
    lines.append(f"{'noise share of G forward (stateless / randn)':44s} {100 * n['noise_share']:.1f}% / "
                 f"{100 * n['randn_share']:.1f}%")
    u = r["upscale"]
    lines.append(f"{'upscale to ' + 'x'.join(map(str, u['sr_size'])) + ' whole / tiled':44s} "
                 f"{u['whole']['seconds']:.2f} s / {u['tiled']['seconds']:.2f} s, max diff "
                 f"{u['max_diff_uint8_levels']} levels")
    t = r["ntire"]
    lines.append(f"{'NTIRE scoring, ' + str(t['samples']) + ' samples (' + t['lpips_weights'][:40] + ')':44s} "
                 f"{t['score_s']:.2f} s (+ {t['generate_s']:.2f} s to generate)")
    tr = r["training"]
    lines.append(f"{'training ' + str(tr['steps']) + ' steps':44s} {tr['seconds']:.0f} s, all losses finite: "
                 f"{tr['all_finite']}, skipped {tr['skipped_steps']}")
    lines.append(f"{'total':44s} {r['meta']['seconds']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON output (default: %(default)s)")
    p.add_argument("--profile", default="paper", help="params.yaml profile to measure (default: %(default)s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device is visible to torch (tests/test_gpu_check.py checks this script on CPU)")
    return args


def run_checks(device: torch.device, s: Shapes, g_cfg: GeneratorConfig, c_cfg: CriticConfig, section: dict,
               ev: dict, meta: dict) -> dict:
    """Every item on ``device`` at sizes ``s``; returns the result dict (keys :data:`KEYS`).

    ``section`` is a profile's train_gan section (its ``lr_patch`` sets the
    patch size), ``ev`` its evaluate section (``tile``, ``tile_pad``), ``meta``
    the run's description (device name, command, ...), completed with the time.
    """
    start = time.perf_counter()
    _, demo = load_params(project_root() / "params.yaml", "demo")
    lr_patch = int(section["lr_patch"])
    result: dict = {"meta": dict(meta)}
    result["matmul"] = check_matmul(device, s)
    peak = result["matmul"]["tflops"]
    print("matmul done", flush=True)
    result["generator"] = check_generator(device, g_cfg, lr_patch, s, peak)
    print("generator done", flush=True)
    result["noise"] = check_noise(device, g_cfg, lr_patch, s)
    gt = make_gt(s.gt_size)
    from srmap.resize import imresize

    lr = torch.from_numpy(imresize(gt, 0.25)).to(device).permute(2, 0, 1)[None].float().div(255)
    torch.manual_seed(0)
    G = Generator(g_cfg).to(device).eval().requires_grad_(False)
    G.set_noise_scales(1.0)
    tile_pad = G.receptive_radius if ev["tile_pad"] is None else int(ev["tile_pad"])
    tile = int(ev["tile"]) or 512
    result["upscale"] = check_upscale(device, G, lr, tile, tile_pad, s)
    result["ntire"] = check_ntire(device, G, lr, gt, tile, tile_pad, s)
    print("upscale and scoring done", flush=True)
    del G
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_s:
        tmp = Path(tmp_s)
        data = prepare_data(tmp / "data", list(demo["data"]["train"]), 4)
        from srmap.checkpoint import save_generator

        torch.manual_seed(0)
        init = tmp / "init.pt"
        G0 = Generator(g_cfg)
        G0.set_noise_scales(1.0)
        save_generator(init, G0, g_cfg, {"stage": "gpu_check"})
        del G0
        result["gan_step"] = check_gan_step(device, data, tmp, init, g_cfg, c_cfg, section, s, peak)
        print("GAN step done", flush=True)
        result["training"] = check_training(device, data, tmp, init, g_cfg, c_cfg, section, s)
    result["meta"]["seconds"] = time.perf_counter() - start
    return {k: result[k] for k in KEYS}


def main(argv: list[str] | None = None) -> dict:
    """Run every check on the GPU at FULL size, write the JSON, print the table; returns the result."""
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    _, prof = load_params(project_root() / "params.yaml", args.profile)
    g_cfg = GeneratorConfig.from_params(prof["model"]["generator"], "model.generator")
    c_cfg = CriticConfig.from_params(prof["model"]["critic"], "model.critic")
    name = torch.cuda.get_device_name(device)
    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "profile": args.profile,
            "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])}
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    result = run_checks(device, FULL, g_cfg, c_cfg, dict(prof["train_gan"]), prof["evaluate"], meta)
    atomic_write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(0 if out["training"]["ok"] else 1)
