"""SRMAP training losses: pure functions of tensors and weights.

Notation follows the report: ``y`` is the LR input, ``x`` the HR ground truth,
``G`` the generator and ``C`` the critic. Every loss returns a float32 scalar
(inputs are upcast, so bf16 activations from autocast do not quantise the
loss) averaged over the batch.

Relativistic pairing (Jolicoeur-Martineau, "On relativistic f-divergences",
2020): the critic scores a fake and a real image and the loss depends only on
their difference. With the concave ``f(t) = -softplus(-t)`` the report's
``sup E[f(C(G(y)) - C(x))]`` becomes the minimisation of
``softplus(C(x) - C(G(y)))`` for the generator and of
``softplus(C(G(y)) - C(x))`` for the critic. The hinge option uses
``f(t) = -relu(1 - t)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ADV_KINDS = ("softplus", "hinge")
HR_CONTEXT = 8  # HR pixels of true context around a patch that the x1/4 kernel (16 HR px wide) reads past its edge


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
                         f"expected equal shapes")


def l1_loss(sr: Tensor, hr: Tensor) -> Tensor:
    """Mean absolute error ``|x - G(y)|`` (report Eq. 3).

    Takes SR output and HR target, float NCHW of equal shape in [0,1]
    (the SR output may overshoot); returns a float32 scalar >= 0.
    """
    _check_pair("sr", sr, "hr", hr)
    return F.l1_loss(sr.float(), hr.float())


def fidelity_loss(lr: Tensor, sr: Tensor, border: int = 0, clamp: bool = False,
                  hr_context: Tensor | None = None) -> Tensor:
    """MAP data term ``|y - bicubic_down(G(y))|`` (report Eq. 4), mean over pixels.

    Takes the LR input (N,3,h,w) and the SR output (N,3,4h,4w), float in [0,1];
    ``sr`` is downscaled by MATLAB-exact antialiased bicubic, differentiably.
    ``border`` LR pixels at each edge are left out of the mean: for training
    patches cut from a larger image, the resize mirrors at the patch edge
    where the true LR saw the neighbouring pixels (2 for x4: the kernel's
    support is 16 HR pixels). ``hr_context`` supervises that band instead
    (ours): the true HR patch widened by c HR pixels on each side
    (N,3,4h+2c,4w+2c), c a multiple of 4 and at least 8 (``HR_CONTEXT``). Its
    ring is put around ``sr``, the whole is downscaled and the c/4 outer LR
    pixels dropped, so every LR pixel of the patch, band included, sees G's
    output where the true LR saw the patch and the true HR where it saw its
    neighbours; ``border`` must then be 0. ``clamp`` scores
    ``clamp(sr, 0, 1)``, the image evaluation sees, with a straight-through
    gradient (the clamp's value, the identity's gradient, so saturated pixels
    still learn). Returns a float32 scalar >= 0. Raises ValueError on shapes
    or a border that leaves nothing. Call it outside autocast: the resize
    would otherwise run its matrix products in bf16.
    """
    from srmap.resize import imresize

    if sr.dim() != 4 or lr.dim() != 4:
        raise ValueError(f"fidelity_loss expects NCHW tensors, got lr {tuple(lr.shape)} and sr {tuple(sr.shape)}")
    if sr.shape[-2:] != (4 * lr.shape[-2], 4 * lr.shape[-1]):
        raise ValueError(f"sr has spatial size {tuple(sr.shape[-2:])}; expected 4x the LR size {tuple(lr.shape[-2:])}")
    b = int(border)
    if b < 0 or 2 * b >= min(lr.shape[-2:]):
        raise ValueError(f"border: {border} LR pixels leave nothing of a {tuple(lr.shape[-2:])} LR patch")
    sr = sr.float()
    if clamp:
        sr = sr + (sr.clamp(0, 1) - sr).detach()
    if hr_context is not None:
        c = (hr_context.shape[-1] - sr.shape[-1]) // 2
        if (b or hr_context.shape[:2] != sr.shape[:2] or c < HR_CONTEXT or c % 4
                or hr_context.shape[-2:] != (sr.shape[-2] + 2 * c, sr.shape[-1] + 2 * c)):
            raise ValueError(f"hr_context has shape {tuple(hr_context.shape)} for sr {tuple(sr.shape)} and border "
                             f"{border}; expected sr's size plus the same multiple of 4 (>= {HR_CONTEXT}) HR pixels "
                             f"on every side, and border 0")
        ring = hr_context.float().clone()
        ring[..., c:-c, c:-c] = 0
        down = imresize(F.pad(sr, (c, c, c, c)) + ring, 0.25)[..., c // 4:-(c // 4), c // 4:-(c // 4)]
    else:
        down = imresize(sr, 0.25)
    _check_pair("bicubic_down(sr)", down, "lr", lr)
    if b:
        down, lr = down[..., b:-b, b:-b], lr[..., b:-b, b:-b]
    return F.l1_loss(down, lr.float())


def _check_kind(kind: str) -> None:
    if kind not in ADV_KINDS:
        raise ValueError(f"adversarial loss kind {kind!r} is not one of {list(ADV_KINDS)}")


def _relativistic(margin: Tensor, kind: str) -> Tensor:
    # `margin` is what the loss wants to grow (fake minus real for G, real minus
    # fake for C); both losses minimise -f(margin) with f concave.
    if kind == "softplus":
        return F.softplus(-margin).mean()
    return F.relu(1.0 - margin).mean()


def generator_adv_loss(c_fake: Tensor, c_real: Tensor, kind: str = "softplus") -> Tensor:
    """Generator's relativistic adversarial loss (report Eq. 5, minimised form).

    Takes critic scores (N,) of fakes ``C(G(y_i))`` and of the paired reals
    ``C(x_i)``; returns ``mean softplus(C(x) - C(G(y)))`` (kind="softplus") or
    ``mean relu(1 + C(x) - C(G(y)))`` (kind="hinge"), a float32 scalar >= 0.
    """
    _check_kind(kind)
    _check_pair("c_fake", c_fake, "c_real", c_real)
    return _relativistic(c_fake.float() - c_real.float(), kind)


def critic_adv_loss(c_real: Tensor, c_fake: Tensor, kind: str = "softplus") -> Tensor:
    """Critic's relativistic loss (report Eq. 7 without the R1 term, minimised form).

    Takes critic scores (N,) of reals ``C(x_i)`` and paired fakes ``C(G(y_i))``;
    returns ``mean softplus(C(G(y)) - C(x))`` (kind="softplus") or
    ``mean relu(1 + C(G(y)) - C(x))`` (kind="hinge"), a float32 scalar >= 0.
    """
    _check_kind(kind)
    _check_pair("c_real", c_real, "c_fake", c_fake)
    return _relativistic(c_real.float() - c_fake.float(), kind)


def r1_penalty(c_real: Tensor, x_real: Tensor) -> Tensor:
    """R1 gradient penalty ``E_x ||grad_x C(x)||^2`` (Mescheder et al. 2018), unweighted.

    Takes the critic scores (N,) of ``x_real`` and ``x_real`` itself, an HR
    batch (N,3,S,S) that had ``requires_grad`` set before the critic saw it.
    Returns a float32 scalar >= 0 that is differentiable w.r.t. the critic's
    parameters; the caller multiplies it by ``gamma / 2``.
    """
    if not x_real.requires_grad:
        raise ValueError("r1_penalty needs x_real.requires_grad_(True) set before computing c_real = C(x_real)")
    # Each score depends only on its own image, so the gradient of the sum
    # gives every per-sample gradient in one backward pass.
    (grad,) = torch.autograd.grad(c_real.float().sum(), x_real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()
