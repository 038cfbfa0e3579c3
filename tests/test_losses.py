"""Loss functions: values against hand-computed formulas, gradient directions, input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from srmap.resize import imresize
from srmap.losses import critic_adv_loss, fidelity_loss, generator_adv_loss, l1_loss, r1_penalty


def test_l1_is_mean_absolute_error():
    sr = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    hr = torch.tensor([[[[0.5, 0.5], [0.0, 0.0]]]])
    assert l1_loss(sr, hr).item() == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    with pytest.raises(ValueError, match="shape"):
        l1_loss(sr, hr[..., :1])


def test_fidelity_is_zero_for_a_consistent_sr_and_grows_otherwise():
    torch.manual_seed(0)
    hr = torch.rand(2, 3, 32, 32)
    lr = imresize(hr, 0.25)
    assert fidelity_loss(lr, hr).item() < 1e-6
    shifted = fidelity_loss(lr, hr + 0.1)  # bicubic weights sum to one: the LR shifts by 0.1 too
    assert shifted.item() == pytest.approx(0.1, abs=1e-5)
    sr = hr.clone().requires_grad_(True)
    fidelity_loss(lr, sr + 0.05).backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0


def test_fidelity_checks_the_scale():
    with pytest.raises(ValueError, match="4x"):
        fidelity_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))


def test_fidelity_upcasts_bf16_input():
    """A bf16 SR (G under autocast) is scored in float32: the value is the float32 loss of the bf16-rounded SR,
    not a bf16 computation (whose 8-bit mantissa would round the ~1e-3 residuals away)."""
    torch.manual_seed(0)
    hr = torch.rand(1, 3, 16, 16)
    lr = imresize(hr, 0.25) + 1e-3 * torch.randn(1, 3, 4, 4)
    sr16 = hr.to(torch.bfloat16)
    out = fidelity_loss(lr, sr16)
    assert out.dtype == torch.float32
    assert out.item() == fidelity_loss(lr, sr16.float()).item()
    in_bf16 = (imresize(sr16, 0.25).float() - lr).abs().mean()  # what a bf16 resize would give
    assert abs(out.item() - in_bf16.item()) > 1e-5


@pytest.mark.parametrize("kind", ["softplus", "hinge"])
def test_adversarial_losses_match_their_formulas(kind):
    c_fake = torch.tensor([0.3, -1.2, 2.0])
    c_real = torch.tensor([1.0, 0.5, -0.7])
    if kind == "softplus":
        want_g = [math.log1p(math.exp(r - f)) for f, r in zip(c_fake.tolist(), c_real.tolist())]
        want_c = [math.log1p(math.exp(f - r)) for f, r in zip(c_fake.tolist(), c_real.tolist())]
    else:
        want_g = [max(0.0, 1 + r - f) for f, r in zip(c_fake.tolist(), c_real.tolist())]
        want_c = [max(0.0, 1 + f - r) for f, r in zip(c_fake.tolist(), c_real.tolist())]
    assert generator_adv_loss(c_fake, c_real, kind).item() == pytest.approx(sum(want_g) / 3, rel=1e-6)
    assert critic_adv_loss(c_real, c_fake, kind).item() == pytest.approx(sum(want_c) / 3, rel=1e-6)


def test_adversarial_gradients_point_the_right_way():
    c_fake = torch.zeros(4, requires_grad=True)
    c_real = torch.zeros(4, requires_grad=True)
    generator_adv_loss(c_fake, c_real).backward()
    assert (c_fake.grad < 0).all()  # G lowers its loss by raising the fakes' scores
    c_fake.grad = c_real.grad = None
    critic_adv_loss(c_real, c_fake).backward()
    assert (c_real.grad < 0).all() and (c_fake.grad > 0).all()  # C separates reals above fakes


def test_adversarial_losses_pair_sample_by_sample():
    # Relativistic pairing: swapping the pairing changes the loss, a mean-vs-mean loss would not.
    c_fake = torch.tensor([3.0, -3.0])
    c_real = torch.tensor([3.0, -3.0])
    paired = generator_adv_loss(c_fake, c_real)
    crossed = generator_adv_loss(c_fake, c_real.flip(0))
    assert paired.item() == pytest.approx(math.log(2))
    assert crossed.item() > paired.item() + 1


def test_adversarial_input_checks():
    with pytest.raises(ValueError, match="not one of"):
        generator_adv_loss(torch.zeros(2), torch.zeros(2), "wgan")
    with pytest.raises(ValueError, match="shape"):
        critic_adv_loss(torch.zeros(2), torch.zeros(3))


def test_r1_of_a_linear_critic_is_the_weight_norm_and_is_differentiable():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.rand(5, 3, 4, 4, requires_grad=True)
    scores = (x * w).flatten(1).sum(1)  # grad_x C(x) = w for every sample
    r1 = r1_penalty(scores, x)
    assert r1.item() == pytest.approx(w.detach().square().sum().item(), rel=1e-5)
    r1.backward()  # double backward reaches the critic's parameters: d||w||^2/dw = 2w
    assert torch.allclose(w.grad, 2 * w.detach(), atol=1e-5)


def test_r1_of_a_conv_critic_matches_autograd_per_sample():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 2, 3)
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    scores = F.leaky_relu(conv(x), 0.2).mean((1, 2, 3))
    want = sum(torch.autograd.grad(scores[i], x, retain_graph=True)[0][i].square().sum() for i in range(3)) / 3
    assert r1_penalty(scores, x).item() == pytest.approx(want.item(), rel=1e-5)


def test_r1_needs_an_input_that_requires_grad():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.flatten(1).sum(1), x)


# ---------------------------------------------------------------------------
# The authors' 0-255 units against ours, and the fidelity border band
# ---------------------------------------------------------------------------


def test_authors_weights_in_0_255_units_equal_ours_with_gradients():
    """10*Fidelity + r1_gamma 10 on 0-255 images (the authors') == alpha, r1_gamma of params.yaml on [0,1] images."""
    import yaml

    from srmap.nets import Critic, CriticConfig
    FIDELITY_BORDER = 2  # the profiles' train_gan.fidelity_border

    paper = yaml.safe_load(open(__import__("srmap.utils").utils.project_root() / "params.yaml"))["paper"]["train_gan"]
    alpha, gamma = paper["alpha"], paper["r1_gamma"]
    torch.manual_seed(0)
    critic = Critic(CriticConfig(basis_size=2, stage_widths=(4, 8), blocks_per_stage=(1, 1), epilog_width=8,
                                 latent_width=8, compression=2))
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    lr01 = torch.rand(2, 3, 8, 8)
    base = torch.rand(2, 3, 32, 32)  # SR of the 8x8 LR
    real = torch.rand(2, 3, 8, 8)  # HR patches the critic (in_size 8) scores
    theta = torch.tensor(1.0, requires_grad=True)  # a stand-in for G's weights

    def critic255(x255):  # the same critic taking 0-255 input, as the authors' does
        return critic(x255 / 255.0)

    # Authors: fidelity and R1 on 0-255 tensors (their LossV2: 0.5 * |grad|^2 inside, times r1_gamma).
    sr255 = theta * 255.0 * base
    fid_a = 10.0 * fidelity_loss(lr01 * 255.0, sr255, border=FIDELITY_BORDER)
    (g_a,) = torch.autograd.grad(fid_a, theta)
    x255 = (real * 255.0).requires_grad_(True)
    (gx,) = torch.autograd.grad(critic255(x255).sum(), x255, create_graph=True)
    r1_a = 10.0 * 0.5 * gx.square().sum([1, 2, 3]).mean()
    r1_a_grads = torch.autograd.grad(r1_a, list(critic.parameters()), allow_unused=True)
    # Ours: [0,1] tensors, the weights of params.yaml.
    fid_o = alpha * fidelity_loss(lr01, theta * base, border=FIDELITY_BORDER)
    (g_o,) = torch.autograd.grad(fid_o, theta)
    x01 = real.clone().requires_grad_(True)
    r1_o = 0.5 * gamma * r1_penalty(critic(x01), x01)
    r1_o_grads = torch.autograd.grad(r1_o, list(critic.parameters()), allow_unused=True)
    torch.testing.assert_close(fid_o, fid_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_o, g_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(r1_o, r1_a, rtol=1e-4, atol=0)
    assert sum(a is not None for a in r1_a_grads) >= len(r1_a_grads) - 1  # all but the head's bias
    for a, b in zip(r1_o_grads, r1_a_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)
    assert r1_a > 0 and fid_a > 0


def test_fidelity_border_band_leaves_only_the_lr_rounding_error():
    """True HR/LR patch pairs: with the border band excluded the loss is the uint8 rounding of the LR."""
    from skimage import data as skdata

    from srmap.resize import imresize
    FIDELITY_BORDER = 2  # the profiles' train_gan.fidelity_border

    hr = skdata.astronaut()[:192, :192]  # uint8 HxWx3
    lr_exact = imresize(torch.from_numpy(hr).permute(2, 0, 1)[None].double(), 0.25)  # float, unrounded
    lr_u8 = lr_exact.round().clamp(0, 255)
    top, left, p = 10, 13, 12  # an LR patch inside the image, and its HR patch
    hr_p = torch.from_numpy(hr).permute(2, 0, 1)[None].double()[..., 4 * top:4 * (top + p), 4 * left:4 * (left + p)]
    lr_p = lr_u8[..., top:top + p, left:left + p]
    b = FIDELITY_BORDER
    inner_round = (lr_p - lr_exact[..., top:top + p, left:left + p])[..., b:-b, b:-b].abs().mean() / 255
    with_band = fidelity_loss(lr_p / 255, hr_p / 255, border=b)
    without = fidelity_loss(lr_p / 255, hr_p / 255)
    assert with_band <= inner_round + 1e-6
    assert without > with_band + 1e-4  # the mirrored border really does cost
    with pytest.raises(ValueError, match="border"):
        fidelity_loss(lr_p / 255, hr_p / 255, border=6)


def _true_pair(top=10, left=13, p=12, context=8):
    """A true LR patch (uint8 rounding of MATLAB bicubic x1/4 of the whole image) and its HR patch, plus that HR
    patch widened by ``context`` px, all float64 in [0, 1]."""
    from skimage import data as skdata

    from srmap.resize import imresize

    hr = torch.from_numpy(skdata.astronaut()[:192, :192]).permute(2, 0, 1)[None].double()
    lr_exact = imresize(hr, 0.25)
    lr_p = lr_exact.round().clamp(0, 255)[..., top:top + p, left:left + p] / 255
    c = context
    ctx = hr[..., 4 * top - c:4 * (top + p) + c, 4 * left - c:4 * (left + p) + c] / 255
    rounding = (lr_p * 255 - lr_exact[..., top:top + p, left:left + p]).abs().mean() / 255
    return lr_p, ctx[..., c:-c, c:-c], ctx, rounding


def test_fidelity_with_hr_context_supervises_the_whole_patch_at_the_rounding_error():
    """The HR ring around a true HR patch makes the full-patch loss (band included) the LR's uint8 rounding,
    and the band's LR pixels then send gradient to G's output, which the border-2 loss never does."""
    lr_p, hr_p, ctx, rounding = _true_pair()
    assert fidelity_loss(lr_p, hr_p, hr_context=ctx) <= rounding + 1e-9
    assert fidelity_loss(lr_p, hr_p) > rounding + 1e-4  # the mirrored border costs without the ring
    sr = (hr_p + 0.02 * torch.randn_like(hr_p)).requires_grad_(True)
    fidelity_loss(lr_p, sr, hr_context=ctx).backward()
    ring_grad = sr.grad.clone()
    sr.grad = None
    fidelity_loss(lr_p, sr, border=2).backward()
    edge = (slice(None), slice(None), slice(0, 2), slice(None))  # HR rows 0-1: only LR rows 0-1 (the band) read them
    assert sr.grad[edge].abs().max() == 0 and ring_grad[edge].abs().max() > 0
    with pytest.raises(ValueError, match="hr_context"):
        fidelity_loss(lr_p, hr_p, hr_context=ctx[..., 4:-4, 4:-4])  # 4 px: less than the kernel reaches
    with pytest.raises(ValueError, match="border 0"):
        fidelity_loss(lr_p, hr_p, border=2, hr_context=ctx)


def test_fidelity_clamp_scores_the_clamped_image_with_the_identity_gradient():
    lr_p, hr_p, _, _ = _true_pair()
    sr = (hr_p * 1.3 - 0.1).requires_grad_(True)  # over- and undershoots
    clamped = sr.detach().clamp(0, 1).requires_grad_(True)
    loss = fidelity_loss(lr_p, sr, clamp=True)
    ref = fidelity_loss(lr_p, clamped)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert loss.item() != pytest.approx(fidelity_loss(lr_p, sr.detach()).item(), rel=1e-3)  # the clamp matters
    loss.backward()
    ref.backward()
    torch.testing.assert_close(sr.grad, clamped.grad)  # straight through: saturated pixels still get gradient
    assert (sr.grad[(sr.detach() > 1) | (sr.detach() < 0)] != 0).any()
