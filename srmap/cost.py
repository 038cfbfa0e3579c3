"""Memory and FLOPs of the networks, measured on the meta device (nothing is computed, no GPU needed).

:func:`tensor_cost` runs a function on meta tensors and records the peak
of the bytes held by live tensors: every tensor an operator creates counts from
its creation until its Python object dies, and tensors autograd saves for the
backward pass are kept alive (and counted) until the backward pass frees them.
This is the quantity the CUDA caching allocator must at least provide; the
allocator's block rounding, fragmentation and cuDNN/cuBLAS workspaces come on
top and are not counted.

:func:`gan_step_cost` composes it into the memory and FLOPs of one SRMAP GAN
step per GPU (weights, EMA, gradients, Adam moments, and the larger of the
critic step and the generator step), and :func:`inference_memory` into the
memory of one generator forward over a whole (padded) tile. scripts/rehearse_paper.py prints both for
the paper profile.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from srmap.nets import Critic, Generator
from srmap.options import SCALE, CriticConfig, GeneratorConfig


class _LiveBytes(TorchDispatchMode):
    """Counts bytes of tensors created by operators while they are alive (``peak``: the maximum), and the
    operators' FLOPs by torch.utils.flop_counter's formulas (``flops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops = 0
        self._counted: set[int] = set()  # id() of the live tensors counted

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        for t in tree_leaves(out):
            # views and in-place results share a storage that is already counted
            if isinstance(t, Tensor) and t._base is None and id(t) not in self._counted:
                nbytes = t.numel() * t.element_size()
                self._counted.add(id(t))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, id(t), nbytes)
        return out


def tensor_cost(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak bytes of live operator-created tensors, FLOPs) while ``fn()`` runs (call it on meta tensors).

    Tensors that exist before the call (weights, inputs) are not counted;
    tensors saved for backward stay counted until the graph frees them. FLOPs
    (2 per multiply-add) use torch.utils.flop_counter's per-operator formulas
    (convolutions, matrix products, their backward passes). Raises whatever
    ``fn`` raises.
    """
    mode = _LiveBytes()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), mode:
        result = fn()
        del result
    return mode.peak, mode.flops


@dataclass(frozen=True)
class GanStepCost:
    """Bytes per GPU of one GAN step (``gan_step_cost``); ``total`` = ``states`` + max of the two steps."""

    states: int          # G, EMA of G and critic weights in float32, their gradients and Adam's two moments
    critic_step: int     # peak tensors of the critic step (fakes without grad, critic on reals and fakes, R1)
    generator_step: int  # peak tensors of the generator step (G forward, critic on fakes and reals, backward)
    flops: int           # both steps, forward and backward (2 per multiply-add; convs and matmuls)

    @property
    def total(self) -> int:
        return self.states + max(self.critic_step, self.generator_step)


def gan_step_cost(gen_cfg: GeneratorConfig, critic_cfg: CriticConfig, *, half: int, lr_patch: int,
                  dtype: torch.dtype = torch.float32) -> GanStepCost:
    """Memory and FLOPs per GPU of one SRMAP GAN step with ``half`` patches per half-batch (batch_size / 2 / GPUs).

    Follows srmap.train's step: the critic half's fakes without gradient, the
    critic on reals (with R1's double backward) and on fakes; then the
    generator half through G and the critic. ``dtype`` is the activations'
    type: float32, or bfloat16 to approximate bf16 autocast (whose weights and
    optimizer state stay float32, as counted in ``states``). The noise is left
    out (noise_scale 0; it adds one map per injector). Returns a GanStepCost (bytes, FLOPs). Raises
    ValueError for ``half`` or ``lr_patch`` below 1.
    """
    if half < 1 or lr_patch < 1:
        raise ValueError(f"gan_step_cost: half={half}, lr_patch={lr_patch}; expected positive integers")
    with torch.device("meta"):
        g, d = Generator(gen_cfg), Critic(critic_cfg)
    n_g, n_d = sum(p.numel() for p in g.parameters()), sum(p.numel() for p in d.parameters())
    states = 4 * (n_g * 5 + n_d * 4)  # float32: G + EMA + grad + 2 moments; critic: weights + grad + 2 moments
    g, d = g.to(dtype), d.to(dtype)  # already on the meta device
    hr = SCALE * lr_patch

    def critic_step() -> None:
        y = torch.empty(half, 3, lr_patch, lr_patch, device="meta", dtype=dtype)
        real = torch.empty(half, 3, hr, hr, device="meta", dtype=dtype, requires_grad=True)
        with torch.no_grad():
            fake = g(y, noise_scale=0)
        c_real, c_fake = d(real), d(fake)
        (grad,) = torch.autograd.grad(c_real.sum(), real, create_graph=True)
        loss = (c_real - c_fake).mean() + grad.square().sum()
        loss.backward()

    def generator_step() -> None:
        y = torch.empty(half, 3, lr_patch, lr_patch, device="meta", dtype=dtype)
        real = torch.empty(half, 3, hr, hr, device="meta", dtype=dtype)
        sr = g(y, noise_scale=0)
        loss = (d(sr) - d(real)).mean() + sr.mean()
        loss.backward()

    (critic, critic_flops), (generator, generator_flops) = tensor_cost(critic_step), tensor_cost(generator_step)
    return GanStepCost(states=states, critic_step=critic, generator_step=generator,
                       flops=critic_flops + generator_flops)


def inference_memory(gen_cfg: GeneratorConfig, height: int, width: int, *,
                     dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one generator forward (no gradient) on a single LR tile of ``height`` x ``width`` pixels.

    Weights (in ``dtype``) plus the peak of live tensors. For tiled
    evaluation, pass the padded tile: min(tile + 2 pad, image side). Raises
    ValueError for non-positive sizes.
    """
    if height < 1 or width < 1:
        raise ValueError(f"inference_memory: tile {height}x{width}; expected positive sizes")
    with torch.device("meta"):
        g = Generator(gen_cfg).to(dtype)
    weights = sum(p.numel() * p.element_size() for p in g.parameters())

    def forward() -> None:
        with torch.no_grad():
            g(torch.empty(1, 3, height, width, device="meta", dtype=dtype), noise_scale=0)

    return weights + tensor_cost(forward)[0]
