"""srmap.cost: live-tensor peaks and FLOPs measured on the meta device, and the GAN-step / tile estimates."""

import pytest
import torch
from torch import nn

from srmap.cost import gan_step_cost, inference_memory, tensor_cost
from srmap.nets import Critic, Generator, flops_per_patch
from srmap.options import CriticConfig, GeneratorConfig

GEN = GeneratorConfig(stem_width=16, feature_widths=(24, 16, 8), blocks_per_stage=(1, 1), compression=4, kernel_size=3)
CRITIC = CriticConfig(basis_size=3, stage_widths=(8, 16, 16, 16, 16), blocks_per_stage=(1, 1, 1, 1, 1),
                      epilog_width=16, latent_width=8, compression=4, kernel_size=3)  # in_size 96 = 4 x 24


def test_forward_without_grad_holds_only_its_output():
    conv = nn.Conv2d(3, 8, 3, padding=1).to("meta")
    x = torch.empty(2, 3, 16, 16, device="meta")
    with torch.no_grad():
        peak, flops = tensor_cost(lambda: conv(x))
    assert peak == 2 * 8 * 16 * 16 * 4  # float32 output; the input existed before
    assert flops == 2 * (2 * 16 * 16) * 8 * 3 * 9  # 2 per multiply-add, per output pixel and channel


def test_saved_activations_count_until_backward_frees_them():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to("meta")
    x = torch.empty(4, 3, 32, 32, device="meta")
    fmap = 4 * 8 * 32 * 32 * 4  # bytes of one feature map
    with torch.no_grad():
        inference, _ = tensor_cost(lambda: net(x))
    training, _ = tensor_cost(lambda: net(x).sum().backward())
    assert inference <= 2 * fmap + 64  # conv1 output and relu output at most (the first is freed after relu)
    assert training >= 3 * fmap  # conv1 and relu outputs kept for backward, plus the last output/its gradient


def test_bf16_halves_the_activations_and_batch_scales_them():
    f32 = gan_step_cost(GEN, CRITIC, half=2, lr_patch=24)
    bf16 = gan_step_cost(GEN, CRITIC, half=2, lr_patch=24, dtype=torch.bfloat16)
    double = gan_step_cost(GEN, CRITIC, half=4, lr_patch=24)
    assert bf16.states == f32.states  # optimizer state stays float32 under autocast
    for field in ("critic_step", "generator_step"):
        assert getattr(bf16, field) == pytest.approx(getattr(f32, field) / 2, rel=0.05), field
        assert getattr(double, field) == pytest.approx(2 * getattr(f32, field), rel=0.05), field
    assert double.flops == pytest.approx(2 * f32.flops, rel=1e-6)


def test_step_flops_match_the_forward_counts():
    # Critic step: G forward, critic forward + backward on reals and fakes, R1's double backward;
    # generator step: G forward + backward, critic forward + backward on fakes and reals.
    # With backward = 2 x forward that is about 4 G + 14 critic forwards per patch (R1 counted as 2).
    with torch.device("meta"):
        g, d = Generator(GEN), Critic(CRITIC)
    g_f, d_f = flops_per_patch(g, (3, 24, 24)), flops_per_patch(d, (3, 96, 96))
    cost = gan_step_cost(GEN, CRITIC, half=3, lr_patch=24)
    assert cost.flops == pytest.approx(3 * (4 * g_f + 14 * d_f), rel=0.15)
    n_g, n_d = sum(p.numel() for p in g.parameters()), sum(p.numel() for p in d.parameters())
    assert cost.states == 4 * (5 * n_g + 4 * n_d)


def test_inference_memory_grows_with_the_tile_and_includes_the_weights():
    weights = sum(p.numel() for p in Generator(GEN).parameters()) * 4
    small, large = inference_memory(GEN, 16, 16), inference_memory(GEN, 32, 32)
    assert weights < small < large
    assert large - weights == pytest.approx(4 * (small - weights), rel=0.1)  # activations scale with the pixels
    with pytest.raises(ValueError, match="tile 0x16"):
        inference_memory(GEN, 0, 16)
