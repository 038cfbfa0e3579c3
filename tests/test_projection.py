"""The consistency projection (srmap.resize.project_consistent): its defining properties against the
MATLAB-exact D of the fidelity loss and LR-PSNR, on odd sizes, and what it gives after uint8 rounding on
the demo's validation photographs."""

import numpy as np
import pytest
import torch

from srmap.config import load_params
from srmap.metrics import lr_psnr
from srmap.nets import Generator
from srmap.options import GeneratorConfig
from srmap.prepare import _load_skimage
from srmap.resize import imresize, project_consistent, project_consistent_box

from conftest import ROOT


def _pair(h=37, w=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, h, w, generator=g, dtype=dtype)
    lr = torch.rand(2, 3, -(-h // 4), -(-w // 4), generator=g, dtype=dtype)
    return x, lr


@pytest.mark.parametrize("h, w", [(37, 50), (48, 48), (9, 13)])
def test_projection_is_consistent(h, w):
    x, lr = _pair(h, w)
    p = project_consistent(x, lr)
    torch.testing.assert_close(imresize(p, 0.25), lr, atol=1e-11, rtol=0)
    assert (imresize(x, 0.25) - lr).abs().max() > 0.1  # x itself was far from consistent


def test_projection_is_idempotent_and_fixes_consistent_images():
    x, lr = _pair()
    p = project_consistent(x, lr)
    torch.testing.assert_close(project_consistent(p, lr), p, atol=1e-12, rtol=0)
    x0 = torch.rand_like(x)  # any image is consistent with its own LR
    torch.testing.assert_close(project_consistent(x0, imresize(x0, 0.25)), x0, atol=1e-12, rtol=0)


def test_the_correction_lies_in_the_row_space_of_d():
    """x - P(x) is orthogonal to D's null space: <x - P(x), v> = 0 for every v with D v = 0."""
    x, lr = _pair(seed=1)
    correction = x - project_consistent(x, lr)
    u = torch.rand_like(x)
    v = project_consistent(u, torch.zeros_like(lr))  # the projection of u onto {v : D v = 0}
    assert imresize(v, 0.25).abs().max() < 1e-12 and v.abs().max() > 0.1
    inner = (correction * v).sum(dim=(-2, -1))
    assert inner.abs().max() < 1e-9 * correction.norm() * v.norm(), inner
    # and it is the smallest change that reaches consistency: any other consistent image is further from x
    assert correction.norm() < (x - (project_consistent(x, lr) + 0.05 * v)).norm()


def test_border_constrains_only_the_interior():
    x, lr = _pair(48, 48, seed=2)
    p = project_consistent(x, lr, border=2)
    down = imresize(p, 0.25)
    torch.testing.assert_close(down[..., 2:-2, 2:-2], lr[..., 2:-2, 2:-2], atol=1e-11, rtol=0)
    assert (down[..., :2, :] - lr[..., :2, :]).abs().max() > 1e-3  # the band is left free


def test_float32_and_gradients():
    x, lr = _pair(20, 24, dtype=torch.float32)
    p = project_consistent(x, lr)
    assert p.dtype == torch.float32
    torch.testing.assert_close(imresize(p, 0.25), lr, atol=2e-5, rtol=0)
    x64, lr64 = _pair(8, 12)
    x64.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: project_consistent(t, lr64), (x64,))


def test_bad_shapes_are_refused():
    x, lr = _pair()
    with pytest.raises(ValueError, match="lr has shape"):
        project_consistent(x, lr[..., :-1])
    with pytest.raises(ValueError, match="float"):
        project_consistent(x.numpy(), lr)


@pytest.fixture(scope="module")
def photos():
    """The demo's validation photographs (params.yaml), centre crops of 128x160 HR, uint8."""
    _, section = load_params(ROOT / "params.yaml", "demo")
    out = []
    for name in section["data"]["valid"]:
        img = _load_skimage(name)
        h, w = img.shape[:2]
        out.append(np.ascontiguousarray(img[(h - 128) // 2:(h + 128) // 2, (w - 160) // 2:(w + 160) // 2, :3]))
    return out


def _project_uint8(sr: torch.Tensor, lr_u8: np.ndarray) -> np.ndarray:
    lr = torch.from_numpy(lr_u8).permute(2, 0, 1)[None].double() / 255
    p = project_consistent_box(sr.double(), lr)
    return (p[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_uint8_outputs_stay_consistent_on_the_demo_photographs(photos):
    """Bicubic upscales and generator outputs, box-projected then rounded to uint8: LR-PSNR >= 60 dB
    (NTIRE 2021 calls >= 45 dB consistent); before the projection they are far below."""
    torch.manual_seed(0)
    _, section = load_params(ROOT / "params.yaml", "demo")
    G = Generator(GeneratorConfig(**section["model"]["generator"])).eval()
    for hr in photos:
        lr_u8 = imresize(hr, 0.25, rounding="half_even")
        lr = torch.from_numpy(lr_u8).permute(2, 0, 1)[None].float() / 255
        bicubic = imresize(lr.double(), 4.0)
        with torch.no_grad():
            generated = G(lr, seed=0)
        for sr in (bicubic, generated):
            before = (sr[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            after = _project_uint8(sr, lr_u8)
            assert lr_psnr(after, hr) >= 60, lr_psnr(after, hr)
            assert lr_psnr(before, hr) < 50


def _smooth_lr(h, w, seed, dtype=np.uint8):
    """An LR image that some [0, peak] HR image downsamples to (a smooth random HR, MATLAB bicubic x1/4)."""
    from PIL import Image

    peak = np.iinfo(dtype).max
    coarse = np.random.default_rng(seed).uniform(0, 1, (h // 2, w // 2, 3))
    hr = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((4 * w, 4 * h),
                                                                                      Image.BICUBIC))
                   for c in range(3)], axis=2).clip(0, 1)
    return np.round(imresize(hr.astype(np.float64), 0.25).clip(0, 1) * peak).astype(dtype)


def test_upscale_consistency_project_with_tiles_alpha_and_16_bit(tmp_path):
    """`srmap upscale --consistency project`: the written file downsamples back to its input (within one
    level after rounding), tiled or not, for 8-bit RGBA (alpha untouched) and 16-bit RGB."""
    from srmap.checkpoint import save_generator
    from srmap.cli import main
    from srmap.imageio import read_image, write_png
    from srmap.inference import upscale_alpha

    torch.manual_seed(0)
    cfg = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(2,), compression=2,
                          kernel_size=3)
    G = Generator(cfg)
    G.set_noise_scales(10.0)
    save_generator(tmp_path / "g.pt", G.eval(), cfg, {})
    rgb8, rgb16 = _smooth_lr(12, 16, 0), _smooth_lr(10, 14, 1, np.uint16)
    alpha = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (12, 1))
    write_png(tmp_path / "in" / "a.png", np.dstack([rgb8, alpha]))
    write_png(tmp_path / "in" / "b.png", rgb16)
    for extra, out in [([], "whole"), (["--tile", "5"], "tiled"), (["--consistency", "none"], "plain")]:
        args = ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / out), "--checkpoint", str(tmp_path / "g.pt"),
                "--device", "cpu"]
        assert main(args + (extra if out == "plain" else ["--consistency", "project", *extra])) == 0
    for name, lr in [("a", rgb8), ("b", rgb16)]:
        peak = float(np.iinfo(lr.dtype).max)
        errors = {}
        for out in ("whole", "tiled", "plain"):
            img = read_image(tmp_path / out / f"{name}_x4.png")
            down = imresize(img.rgb.astype(np.float64) / peak, 0.25)
            errors[out] = np.abs(down - lr / peak).max() * peak  # in levels of the file's bit depth
            if name == "a":
                np.testing.assert_array_equal(img.alpha, upscale_alpha(alpha))
        assert errors["whole"] <= 1.0 and errors["tiled"] <= 1.0, errors
        assert errors["plain"] > 5 * max(errors["whole"], 0.2), errors
