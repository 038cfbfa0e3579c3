"""Tests for srmap.nets: shapes, noise determinism, tiling, init, gradients, configs."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from srmap.nets import (
    CriticConfig,
    Discriminator,
    Generator,
    GeneratorConfig,
    ResidualBlock,
    count_params,
    critic_config,
    flops_per_patch,
    generator_config,
    hash32,
    hash_normal,
    info_text,
)
from srmap.utils import project_root

TINY_G = GeneratorConfig(stem_width=8, feature_widths=(12, 8, 4), stages=2, blocks_per_stage=2, compression=2)
TINY_D = CriticConfig(in_size=32, widths=(4, 8), blocks_per_stage=1, compression=2, fc_widths=(8,))
DEMO_G = dict(stem_width=32, feature_widths=[48, 32, 16], stages=2, blocks_per_stage=2, compression=4,
              kernel_size=3, noise_init=0.05)
DEMO_D = dict(in_size=96, widths=[16, 32, 48, 64], blocks_per_stage=1, compression=4, kernel_size=3,
              fc_widths=[64])


def perturbed(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add small Gaussian noise to every parameter, so zero-initialised layers stop hiding the trunk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def bilinear_x4(y: torch.Tensor) -> torch.Tensor:
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    return up(up(y))


def tiled(g: Generator, y: torch.Tensor, tile: int, pad: int, seed: int) -> torch.Tensor:
    """Run ``g`` tile by tile with ``pad`` LR pixels of context, crop the context, stitch."""
    n, _, h, w = y.shape
    out = torch.empty(n, 3, 4 * h, 4 * w)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            t0, l0 = max(top - pad, 0), max(left - pad, 0)
            t1, l1 = min(top + tile + pad, h), min(left + tile + pad, w)
            sr = g(y[..., t0:t1, l0:l1], seed=seed, origin=(t0, l0))
            th, tw = min(tile, h - top), min(tile, w - left)
            r, c = 4 * (top - t0), 4 * (left - l0)
            out[..., 4 * top : 4 * (top + th), 4 * left : 4 * (left + tw)] = sr[..., r : r + 4 * th, c : c + 4 * tw]
    return out


@pytest.fixture(scope="module")
def gen() -> Generator:
    torch.manual_seed(0)
    return perturbed(Generator(TINY_G)).eval()


# ---------------------------------------------------------------------------
# Shapes and determinism
# ---------------------------------------------------------------------------


def test_odd_sizes_give_4x_finite_output(gen):
    y = torch.rand(2, 3, 37, 53)
    with torch.no_grad():
        for seed in (None, 5):
            sr = gen(y, seed=seed)
            assert sr.shape == (2, 3, 148, 212)
            assert torch.isfinite(sr).all()


def test_same_seed_same_sample_different_seed_different(gen):
    y = torch.rand(1, 3, 20, 17)
    with torch.no_grad():
        a, b, c = gen(y, seed=7), gen(y, seed=7), gen(y, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_noise_scale_zero_is_deterministic(gen):
    y = torch.rand(1, 3, 20, 17)
    with torch.no_grad():
        outs = [gen(y, seed=s, noise_scale=0.0) for s in (None, 0, 1, 99)]
        noisy = gen(y, seed=0)
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    assert (noisy - outs[0]).abs().max() > 1e-3


def test_sample_independent_of_batch(gen):
    y = torch.rand(3, 3, 19, 23)
    with torch.no_grad():
        batch = gen(y, seed=4)
        single = gen(y[1:2], seed=4)
        per_image = gen(y, seed=[4, 5, 6])
        alone = gen(y[2:3], seed=6)
    torch.testing.assert_close(batch[1:2], single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_image[2:3], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_image[0:1], batch[0:1], rtol=1e-5, atol=1e-6)


def test_global_rng_noise_reproducible_under_manual_seed(gen):
    y = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        torch.manual_seed(3)
        a = gen(y)
        torch.manual_seed(3)
        b = gen(y)
        c = gen(y)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_seed_validation(gen):
    y = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="got 3 seeds for a batch of 2"):
        gen(y, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        gen(y, seed=-1)
    with pytest.raises(ValueError, match=r"\(N,3,h,w\)"):
        gen(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="float LR batch"):
        gen(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_channels_last_and_bf16_autocast(gen):
    y = torch.rand(2, 3, 15, 11)
    with torch.no_grad():
        ref = gen(y, seed=1)
        cl = copy.deepcopy(gen).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(y.contiguous(memory_format=torch.channels_last), seed=1), ref,
                                   rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = gen(y, seed=1)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1


# ---------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------


WIDE_KERNEL_G = GeneratorConfig(stem_width=8, feature_widths=(12, 8, 4), stages=1, blocks_per_stage=1,
                                compression=2, kernel_size=5)


@pytest.mark.parametrize("cfg, radius", [(TINY_G, 11), (WIDE_KERNEL_G, 9)])
def test_tiled_equals_whole_image(cfg, radius):
    torch.manual_seed(0)
    g = perturbed(Generator(cfg)).eval()
    # k=3: 1 stem + 2*4 block convs + 1 upsample conv at LR, + 1 for the conv at x2.
    assert g.receptive_radius == radius
    y = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        whole = g(y, seed=2)
        exact = tiled(g, y, tile=12, pad=radius, seed=2)
        short = tiled(g, y, tile=12, pad=radius - 1, seed=2)
    torch.testing.assert_close(exact, whole, rtol=1e-5, atol=1e-5)
    if cfg is WIDE_KERNEL_G:
        # The radius is tight, not a vacuous over-estimate: one pixel less context shows.
        assert (short - whole).abs().max() > 1e-4


def test_tile_noise_matches_whole_noise():
    whole = hash_normal([3], 2, 0, 0, 30, 40)
    crop = hash_normal([3], 2, 7, 11, 9, 13)
    assert torch.equal(crop, whole[:, :, 7:16, 11:24])


# ---------------------------------------------------------------------------
# Noise statistics
# ---------------------------------------------------------------------------


def _lowbias32_reference(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32, whose multiplication wraps mod 2**32 natively."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def test_hash_matches_uint32_reference():
    values = np.random.default_rng(0).integers(0, 2**32, size=10_000, dtype=np.int64)
    values[:4] = [0, 1, 2**31, 2**32 - 1]
    expected = _lowbias32_reference(values).astype(np.int64)
    got = hash32(torch.from_numpy(values.copy()))
    assert np.array_equal(got.numpy(), expected)
    assert [hash32(int(v)) for v in values[:50]] == expected[:50].tolist()
    assert int(values[5]) == int(torch.from_numpy(values)[5])  # the input tensor is left untouched


def test_hash_noise_is_standard_normal():
    z = hash_normal([0, 1], 4, 0, 0, 128, 128)  # 131072 values
    flat = z.flatten().double()
    assert abs(flat.mean().item()) < 0.02
    assert abs(flat.std().item() - 1.0) < 0.02
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # Neighbouring pixels, layers and seeds are uncorrelated.
    corr = lambda a, b: np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]  # noqa: E731
    assert abs(corr(z[0, 0, :, :-1], z[0, 0, :, 1:])) < 0.02
    assert abs(corr(z[0, 0, :-1], z[0, 0, 1:])) < 0.02
    assert abs(corr(z[0, 0], z[0, 1])) < 0.02
    assert abs(corr(z[0], z[1])) < 0.02


# ---------------------------------------------------------------------------
# Initialisation and gradients
# ---------------------------------------------------------------------------


def test_identity_at_init():
    torch.manual_seed(1)
    g = Generator(TINY_G)
    y = torch.rand(2, 3, 13, 9)
    with torch.no_grad():
        assert torch.equal(g(y, seed=0), bilinear_x4(y))
        assert torch.equal(g(y), bilinear_x4(y))
    block = ResidualBlock(8, 2, 3, 0.0, 0.05)
    x = torch.rand(1, 8, 6, 6)  # the generator trunk is non-negative (ReLU after the stem)
    assert torch.equal(block(x, torch.randn(1, 1, 6, 6)), x)


def _assert_grads(module, loss_fn, name):
    module.zero_grad(set_to_none=True)
    loss_fn().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    return [n for n, p in module.named_parameters() if not p.grad.abs().gt(0).any()]


def test_gradients_reach_every_parameter():
    """At init the zero-initialised convs (block outputs, toRGB) block all gradient
    behind them, so: every parameter must get a gradient tensor at init, and a
    nonzero one once the zero-initialised layers are slightly perturbed."""
    torch.manual_seed(0)
    g, d = Generator(TINY_G), Discriminator(TINY_D)
    y, x = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)

    def loss():
        return d(g(y)).sum() + d(x).sum()

    _assert_grads(g, loss, "G at init")
    _assert_grads(d, loss, "D at init")
    perturbed(g, 0.02)
    perturbed(d, 0.02)
    assert _assert_grads(g, loss, "G") == []
    assert _assert_grads(d, loss, "D") == []


def test_critic_supports_r1_double_backward():
    torch.manual_seed(0)
    d = perturbed(Discriminator(TINY_D), 0.02)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    penalty = grad.square().sum()
    penalty.backward()
    assert torch.isfinite(penalty)
    # Biases drop out of an input gradient through piecewise-linear activations;
    # every weight must still be trained by the penalty.
    weights = [n for n, p in d.named_parameters() if p.dim() > 1 and p.grad is None]
    assert not weights, f"R1 penalty does not reach {weights}"


# ---------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------


def test_critic_scores_shape_and_rejects_wrong_size():
    d = Discriminator(TINY_D)
    assert d(torch.rand(3, 3, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match=r"expected HR patches \(N,3,32,32\).*got shape \(1, 3, 48, 32\)"):
        d(torch.rand(1, 3, 48, 32))


# ---------------------------------------------------------------------------
# Configs, size and cost
# ---------------------------------------------------------------------------


def test_configs_from_params_mappings():
    g = generator_config(DEMO_G)
    assert g.feature_widths == (48, 32, 16) and isinstance(g.feature_widths, tuple)
    c = critic_config(DEMO_D)
    assert c.widths == (16, 32, 48, 64) and c.fc_widths == (64,)
    with pytest.raises(ValueError, match="model.generator: unknown key 'stem_widht'"):
        generator_config({**DEMO_G, "stem_widht": 3})
    missing = dict(DEMO_G)
    del missing["noise_init"]
    with pytest.raises(ValueError, match="missing key 'noise_init'"):
        generator_config(missing)
    with pytest.raises(ValueError, match=r"model.generator.feature_widths: expected 3 entries"):
        generator_config({**DEMO_G, "feature_widths": [48, 32]})
    with pytest.raises(ValueError, match=r"model.critic.in_size: 100 is not divisible by 2\*\*4"):
        critic_config({**DEMO_D, "in_size": 100})
    with pytest.raises(ValueError, match="model.critic: unknown key 'fc'"):
        critic_config({**DEMO_D, "fc": [1]})
    with pytest.raises(ValueError, match=r"GeneratorConfig.scale: only 4"):
        GeneratorConfig(scale=2)


def _documented(label: str) -> int:
    text = (project_root() / "docs" / "model.md").read_text(encoding="utf-8")
    m = re.search(re.escape(label) + r":\s*\*\*([\d,]+)\*\*", text)
    assert m, f"docs/model.md has no '{label}: **N**' line"
    return int(m.group(1).replace(",", ""))


def test_paper_parameter_counts_match_docs():
    with torch.device("meta"):
        g, d = Generator(GeneratorConfig()), Discriminator(CriticConfig())
    assert count_params(g) == _documented("Generator parameters (paper)")
    assert count_params(d) == _documented("Critic parameters (paper)")
    assert g.receptive_radius == _documented("Generator receptive radius (paper, LR px)")


def test_flops_per_patch_counts_convs():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert flops_per_patch(conv, (3, 10, 10)) == 2 * 3 * 8 * 9 * 100
    assert flops_per_patch(conv, (4, 3, 10, 10)) == 2 * 3 * 8 * 9 * 100
    text = info_text(generator_config(DEMO_G), critic_config(DEMO_D), 24)
    assert "96,758 parameters" in text and "47,065 parameters" in text
    assert "warning" not in text
    assert "warning: critic in_size 96" in info_text(generator_config(DEMO_G), critic_config(DEMO_D), 48)
