"""Tests for srmap.nets: shapes, noise determinism, tiling, init, gradients, configs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from srmap.nets import Critic, Generator, count_params, flops_per_patch, info_text
from srmap.options import CriticConfig, GeneratorConfig, OptionError, from_params

TINY_G = GeneratorConfig(stem_width=8, feature_widths=(12, 8, 4), blocks_per_stage=(2, 2), compression=2)
TINY_D = CriticConfig(basis_size=2, stage_widths=(4, 8, 8), blocks_per_stage=(1, 2, 1), epilog_width=8,
                      latent_width=8, compression=2)  # 16x16 input
DEMO_G = dict(stem_width=32, feature_widths=[48, 32, 16], blocks_per_stage=[2, 2], compression=4, kernel_size=3)
DEMO_D = dict(basis_size=3, stage_widths=[16, 32, 32, 48, 64], blocks_per_stage=[1, 1, 1, 1, 1], epilog_width=64,
              latent_width=32, compression=4, kernel_size=3)

# Parity with the authors' networks (r-mohanty/Super-Rez, src/model/NetworksV2.py): parameter count,
# number of parameter tensors and the SHA-256 of the JSON list of their shapes in registration order,
# computed once from the authors' own classes -- Generator() and the critic src/loss/Main.py builds,
# Critic(BasisSize=3, StageWidths=[256, 256, 512, 512, 512, 1024], BlocksPerStage=[1, 1, 2, 2, 2, 1]) --
# in a scratch folder outside this repository.
AUTHORS_G = (20_933_504, 416, "ad46c8edbc1c06c1eefbf829bed34e37b62e177d45aa9045a028628c43d47562")
AUTHORS_D = (20_817_025, 57, "38a416a0d8b449ff5166321d1879898fd704000e737ca27a299d335082ebdc05")


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
    g = perturbed(Generator(TINY_G)).eval()
    g.set_noise_scales(10.0)  # the networks work in 0-255 units: noise of 10/255 per injector
    return g


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
    # bf16 rounding (8-bit mantissa) through the network: measured max 0.0040, mean 0.00035 on [0, 1] outputs
    diff = (low.float() - ref).abs()
    assert 0 < diff.mean() < 1e-3 and diff.max() < 1e-2, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------


WIDE_KERNEL_G = GeneratorConfig(stem_width=8, feature_widths=(12, 8, 4), blocks_per_stage=(1,),
                                compression=2, kernel_size=5)


@pytest.mark.parametrize("cfg", [TINY_G, WIDE_KERNEL_G])
def test_tiled_equals_whole_image(cfg):
    """Every injector is on (x2 and x4 resolution included): tiles with tile_pad = radius are exact."""
    torch.manual_seed(0)
    g = perturbed(Generator(cfg), 0.05).eval()
    g.set_noise_scales(10.0)
    radius = g.receptive_radius
    y = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        whole = g(y, seed=2)
        exact = tiled(g, y, tile=12, pad=radius, seed=2)
        short = tiled(g, y, tile=12, pad=2, seed=2)
    torch.testing.assert_close(exact, whole, rtol=1e-5, atol=1e-5)
    assert (short - whole).abs().max() > 1e-4  # context matters: the check above is not vacuous


def test_receptive_radius_paper():
    with torch.device("meta"):
        g = Generator(GeneratorConfig())
    # 4 * (1 + 2*64) LR convs in HR px, + the x2 block (4 + 4 + 4 + 2) and the x4 block (2 + 2 + 2 + 1) -> ceil(537 / 4)
    assert g.receptive_radius == 135


# ---------------------------------------------------------------------------
# Initialisation and gradients
# ---------------------------------------------------------------------------


def test_identity_at_init():
    """toRGB and every noise scale start at zero: the output is the bilinear x4 of the input."""
    torch.manual_seed(1)
    g = Generator(TINY_G)
    y = torch.rand(2, 3, 13, 9)
    with torch.no_grad():
        torch.testing.assert_close(g(y, seed=0), bilinear_x4(y), rtol=0, atol=1e-6)
        torch.testing.assert_close(g(y), bilinear_x4(y), rtol=0, atol=1e-6)
    assert all(float(m.scale.detach().abs().max()) == 0 for m in g.injectors())


def test_every_injector_changes_the_output_once_its_scale_is_nonzero():
    torch.manual_seed(0)
    g = perturbed(Generator(TINY_G), 0.05).eval()
    g.set_noise_scales(0.0)
    y = torch.rand(1, 3, 10, 9)
    groups = g.injector_groups()
    assert sum(len(v) for v in groups.values()) == len(g.injectors()) == 1 + 2 * 4 + 1 + 3 * 2
    with torch.no_grad():
        ref = g(y, seed=3)
        torch.testing.assert_close(ref, g(y, noise_scale=0))  # all scales 0: no noise
        for inj in g.injectors():
            inj.scale.fill_(10.0)  # 10/255 in [0,1] units
            assert (g(y, seed=3) - ref).abs().max() > 1e-4, f"injector {inj.index} has no effect"
            inj.scale.zero_()
    g.set_noise_scales(0.25)
    means = g.noise_scale_means()
    assert set(means) == {"stem", "trunk", "features", "up_x2", "up_x4"}
    assert all(v == pytest.approx(0.25) for v in means.values())


def test_paper_networks_match_the_authors():
    import hashlib
    import json

    with torch.device("meta"):
        g, d = Generator(GeneratorConfig()), Critic(CriticConfig())
    for net, (count, tensors, digest) in ((g, AUTHORS_G), (d, AUTHORS_D)):
        shapes = [list(p.shape) for p in net.parameters()]
        assert count_params(net) == count
        assert len(shapes) == tensors
        assert hashlib.sha256(json.dumps(shapes).encode()).hexdigest() == digest
    assert len(g.injectors()) == 136 and CriticConfig().in_size == 192


def test_critic_head_float32_under_bf16_autocast():
    torch.manual_seed(0)
    d = perturbed(Critic(TINY_D), 0.05)
    with torch.no_grad():
        d.head.bias.fill_(100.0)  # scores around 100, where bf16 steps are 0.5
        d.head.weight.mul_(10.0)
    seen = {}
    d.fc_act.register_forward_hook(lambda m, i, o: seen.update(h=o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = d(torch.rand(4, 3, 16, 16))
    assert seen["h"].dtype == torch.bfloat16  # the body did run in bf16
    assert scores.dtype == torch.float32
    expected = F.linear(seen["h"].float(), d.head.weight, d.head.bias).squeeze(1)
    assert torch.equal(scores, expected)
    assert not torch.equal(scores, expected.bfloat16().float())  # a bf16 head would have rounded them


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
    g, d = Generator(TINY_G), Critic(TINY_D)
    y, x = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 16, 16)

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
    d = perturbed(Critic(TINY_D), 0.02)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    penalty = grad.square().sum()
    penalty.backward()
    assert torch.isfinite(penalty)
    # Every weight must be trained by the penalty.
    weights = [n for n, p in d.named_parameters() if p.dim() > 1 and p.grad is None]
    assert not weights, f"R1 penalty does not reach {weights}"
    # ...and its gradient is the right one: a central difference on one weight of each conv, in float64.
    d64, x64 = d.double(), x.detach().double().requires_grad_(True)

    def r1() -> torch.Tensor:
        (g,) = torch.autograd.grad(d64(x64).sum(), x64, create_graph=True)
        return g.square().sum()

    d64.zero_grad()
    r1().backward()
    for name, p in [(n, p) for n, p in d64.named_parameters() if p.dim() == 4][:3]:
        analytic, eps = p.grad.flatten()[0].item(), 1e-6
        values = []
        for step in (eps, -2 * eps, eps):  # up, down, back
            with torch.no_grad():
                p.view(-1)[0] += step
            values.append(r1().item())
        up, down = values[:2]
        assert abs(analytic - (up - down) / (2 * eps)) <= 1e-5 * max(1.0, abs(analytic)), name


# ---------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------


def test_critic_scores_shape_and_rejects_wrong_size():
    d = Critic(TINY_D)
    assert d(torch.rand(3, 3, 16, 16)).shape == (3,)
    with pytest.raises(ValueError, match=r"expected HR patches \(N,3,16,16\).*got shape \(1, 3, 48, 16\)"):
        d(torch.rand(1, 3, 48, 16))


# ---------------------------------------------------------------------------
# Configs, size and cost
# ---------------------------------------------------------------------------


def test_configs_from_params_mappings():
    g = from_params(GeneratorConfig, DEMO_G, "model.generator")
    assert g.feature_widths == (48, 32, 16) and isinstance(g.feature_widths, tuple) and g.scale == 4
    c = from_params(CriticConfig, DEMO_D, "model.critic")
    assert c.stage_widths == (16, 32, 32, 48, 64) and c.in_size == 96
    with pytest.raises(OptionError, match="model.generator: unknown key 'stem_widht'"):
        from_params(GeneratorConfig, {**DEMO_G, "stem_widht": 3}, "model.generator")
    missing = dict(DEMO_G)
    del missing["compression"]
    with pytest.raises(OptionError, match="model.generator: missing key 'compression'"):
        from_params(GeneratorConfig, missing, "model.generator")
    with pytest.raises(OptionError, match=r"^model.generator.feature_widths: expected 3 positive integers"):
        from_params(GeneratorConfig, {**DEMO_G, "feature_widths": [48, 32]}, "model.generator")
    with pytest.raises(OptionError, match=r"^model.critic.blocks_per_stage: expected 5 entries"):
        from_params(CriticConfig, {**DEMO_D, "blocks_per_stage": [1, 1]}, "model.critic")
    with pytest.raises(OptionError, match=r"^kernel_size: expected an odd positive integer"):
        GeneratorConfig(kernel_size=4)
    with pytest.raises(OptionError, match=r"^compression: expected at most the narrowest block width 8"):
        GeneratorConfig(stem_width=8, compression=16)


def test_flops_per_patch_counts_convs():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert flops_per_patch(conv, (3, 10, 10)) == 2 * 3 * 8 * 9 * 100
    assert flops_per_patch(conv, (4, 3, 10, 10)) == 2 * 3 * 8 * 9 * 100
    text = info_text(GeneratorConfig(), CriticConfig(), 48)
    assert "generator: 20,933,504 parameters" in text and "critic:    20,817,025 parameters" in text
    assert "per 48x48 LR patch" in text and "136 noise injectors" in text and "warning" not in text
    assert "warning: critic in_size 96" in info_text(GeneratorConfig(**DEMO_G), CriticConfig(**DEMO_D), 48)
