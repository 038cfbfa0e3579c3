"""benchmarks/gpu_check.py --dry-run: the prepared GPU script runs end to end on CPU with tiny shapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]
ITEM_KEYS = {
    "meta": {"device", "torch", "cuda", "dry_run", "profile", "command", "seconds"},
    "matmul": {"n", "seconds", "tflops"},
    "generator": {"batch", "lr_patch", "flops_per_step", "eager", "compiled", "compiled_vs_eager"},
    "gan_step": {"batch", "flops_per_step", "eager", "compiled", "compiled_vs_eager"},
    "noise": {"batch", "injectors", "forward_no_noise_s", "forward_hash_s", "forward_randn_s", "hash_share",
              "randn_share"},
    "upscale": {"lr_size", "sr_size", "tile", "tile_pad", "whole", "tiled", "max_abs_diff", "max_diff_uint8_levels"},
    "ntire": {"samples", "generate_s", "score_s", "lpips_pretrained", "lpips_weights", "scores"},
    "training": {"steps", "seconds", "all_finite", "skipped_steps", "first", "last", "ok"},
}


@pytest.mark.timeout(300)
def test_dry_run_writes_every_key(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=tool_env(ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result) == set(ITEM_KEYS)
    for item, keys in ITEM_KEYS.items():
        assert set(result[item]) == keys, item
    for item in ("generator", "gan_step"):
        for mode in ("eager", "compiled"):
            m = result[item][mode]
            assert {"steps_per_s", "patches_per_s", "tflops", "mfu", "peak_mem_gib"} <= set(m)
            assert m["steps_per_s"] > 0 and 0 < m["mfu"] < 10
    assert result["meta"]["dry_run"] is True and result["meta"]["device"] == "cpu"
    assert result["upscale"]["max_diff_uint8_levels"] == 0  # tiles with a full receptive-radius pad are exact
    assert set(result["ntire"]["scores"]) >= {"LPIPS_mean", "LRPSNR_mean", "score", "PSNR", "SSIM"}
    assert result["training"]["ok"] and result["training"]["steps"] == 3
    assert "GAN step batch 4, compiled" in proc.stdout and "training 3 steps" in proc.stdout


def test_full_run_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
                          env=tool_env(ROOT, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
