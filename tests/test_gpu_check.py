"""benchmarks/gpu_check.py, the prepared GPU check, run on CPU with tiny networks and shapes.

The benchmark file only measures; this test calls its ``run_checks`` in-process
and checks every JSON key and that each item is sane. torch.compile runs with
the ``aot_eager`` backend here (the inductor path is tests/test_compile.py's).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tool_env
from srmap.options import CriticConfig, GeneratorConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

TINY_G = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(1,), compression=4, kernel_size=3)
TINY_C = CriticConfig(basis_size=2, stage_widths=(4, 8, 8, 8), blocks_per_stage=(1, 1, 1, 1), epilog_width=8,
                      latent_width=8, compression=4, kernel_size=3)  # in_size 32 = 4 x lr_patch 8
TINY = gpu_check.Shapes(matmul=256, half=2, iters=2, warmup=1, gan_steps=4, log_every=2, gt_size=(64, 48),
                        samples=10, train_steps=3, workers=0)
ITEM_KEYS = {
    "meta": {"device", "command", "seconds"},
    "matmul": {"n", "seconds", "tflops"},
    "generator": {"batch", "lr_patch", "flops_per_step", "eager", "compiled", "compiled_vs_eager"},
    "gan_step": {"batch", "flops_per_step", "eager", "compiled", "compiled_vs_eager"},
    "noise": {"batch", "injectors", "forward_no_noise_s", "forward_noise_s", "forward_randn_s", "noise_share",
              "randn_share"},
    "upscale": {"lr_size", "sr_size", "tile", "tile_pad", "whole", "tiled", "max_abs_diff", "max_diff_uint8_levels"},
    "ntire": {"samples", "generate_s", "score_s", "lpips_pretrained", "lpips_weights", "scores"},
    "training": {"steps", "seconds", "all_finite", "skipped_steps", "first", "last", "ok"},
}


@pytest.mark.timeout(600)
def test_every_item_runs_on_cpu_with_tiny_shapes(monkeypatch, capsys):
    from srmap.config import load_params

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": "aot_eager"}))
    torch.set_num_threads(1)
    _, paper = load_params(ROOT / "params.yaml", "paper")
    section = dict(paper["train_gan"], lr_patch=8)
    result = gpu_check.run_checks(torch.device("cpu"), TINY, TINY_G, TINY_C, section, {"tile": 8, "tile_pad": None},
                                  {"device": "cpu", "command": "pytest"})
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert tuple(result) == gpu_check.KEYS
    for item, keys in ITEM_KEYS.items():
        assert set(result[item]) == keys, item
    for item in ("generator", "gan_step"):
        for mode in ("eager", "compiled"):
            m = result[item][mode]
            assert {"steps_per_s", "patches_per_s", "tflops", "mfu", "peak_mem_gib"} <= set(m)
            assert m["steps_per_s"] > 0 and 0 < m["mfu"] < 10
    noise = result["noise"]
    assert noise["forward_noise_s"] > 0 and noise["noise_share"] < 1 and noise["injectors"] > 0
    assert result["upscale"]["max_diff_uint8_levels"] == 0  # tiles with a full receptive-radius pad are exact
    assert set(result["ntire"]["scores"]) >= {"LPIPS_mean", "LRPSNR_mean", "score", "PSNR", "SSIM"}
    assert result["training"]["ok"] and result["training"]["steps"] == 3
    assert "torch.compile on" in out and "GAN step done" in out
    table = gpu_check.table(result)
    assert "GAN step batch 4, compiled" in table and "training 3 steps" in table


def test_full_run_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
                          env=tool_env(ROOT, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
