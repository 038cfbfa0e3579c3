"""The SRMAP networks: the noise-injected 4x generator and the anti-aliased residual critic.

Both are structurally identical to the authors' ``Generator`` and ``Discriminator``
(r-mohanty/Super-Rez, ``src/model/NetworksV2.py``; the critic as built in
``src/loss/Main.py``): same layers, widths, parameter order, activation (SiLU with a
learned bias), initialisation (fan-in scaled normal with their gains, the last conv of
every residual branch at zero) and reflect padding. Both take images in [0, 1] and
work inside at the authors' 0-255 scale (the generator also shifts by the DIV2K RGB
mean like their EDSR wrapper), so the authors' loss weights carry over once converted
(docs/training.md). Our own part is where the noise comes from (:mod:`srmap.noise`: a
stateless function of image key, injector, channel and global pixel), injected per
channel at every place the authors inject it. The hyper-parameters are the records
:class:`~srmap.options.GeneratorConfig` and :class:`~srmap.options.CriticConfig`.
``docs/model.md`` documents all of it.

Reading order: layers and blocks, then the two models, then their size and cost.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srmap.noise import NoiseSource, seed_keys
from srmap.options import CriticConfig, GeneratorConfig

RGB_RANGE = 255.0  # the authors' networks see pixel values in [0, 255] (their option --rgb_range 255)
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean their EDSR MeanShift subtracts (fraction of RGB_RANGE)
ACT_GAIN = math.sqrt(2.0)  # init gain of a layer followed by the biased SiLU (authors' BiasedActivation.Gain)

# ---------------------------------------------------------------------------
# Layers and blocks
# ---------------------------------------------------------------------------


def _msr(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Conv2d | nn.Linear:
    """Fan-in scaled normal init N(0, gain^2 / fan_in), bias 0 (the authors' MSRInitializer)."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.normal_(0.0, gain / math.sqrt(fan_in)) if gain else layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _conv(cin: int, cout: int, k: int, gain: float) -> nn.Conv2d:
    """k x k conv, reflect 'same' padding, no bias (the activation after it carries the bias)."""
    return _msr(nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="reflect", bias=False), gain)


def _conv1x1(cin: int, cout: int, gain: float) -> nn.Conv2d:
    return _msr(nn.Conv2d(cin, cout, 1, bias=False), gain)


class BiasedActivation(nn.Module):
    """SiLU(x + b) with a learned per-channel bias b, initialised to 0 (authors' BiasedActivation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,C,H,W) or (N,C) -> same shape."""
        b = self.bias.view(1, -1, 1, 1) if x.dim() == 4 else self.bias.view(1, -1)
        return F.silu(x + b.to(x.dtype))


class NoiseInjector(nn.Module):
    """Adds per-channel independent standard-normal noise times a learned per-channel scale (init 0).

    ``index`` (set by the Generator: its place in forward order) keys this
    injector's noise; ``factor`` is its resolution in multiples of the LR input
    (1, 2 or 4).
    """

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels))
        self.factor = factor
        self.index = 0

    def forward(self, h: Tensor, noise: NoiseSource) -> Tensor:
        """h: (N,C,H,W) -> h + scale[c] * z, z ~ N(0, 1) from ``noise`` (float32 maps; bf16 stays bf16)."""
        z = noise.sample(h, self.index, self.factor)  # (N,C,H,W) float32 or None
        if z is None:
            return h
        scale = self.scale.view(1, -1, 1, 1)
        if h.dtype == z.dtype:
            return torch.addcmul(h, z, scale)  # one pass over the map
        return h + (scale * z).to(h.dtype)


def _lowpass(x: Tensor) -> Tensor:
    """Depthwise [1,2,1]x[1,2,1]/16 blur with reflect padding: (N,C,H,W) -> (N,C,H,W)."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4.0
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=x.shape[1])


def _bilinear_x2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class GeneratorBlock(nn.Module):
    """Residual block: conv -> noise -> act -> conv, added to the pre-activation trunk; then noise -> act.

    Carries two tensors: the trunk x (pre-activation) and its activated maps a.
    """

    def __init__(self, width: int, compression: int, k: int, factor: int = 1):
        super().__init__()
        inner = width // compression
        self.conv1 = _conv(width, inner, k, ACT_GAIN)
        self.conv2 = _conv(inner, width, k, 0.0)  # the branch starts at zero
        self.noise1 = NoiseInjector(inner, factor)
        self.noise2 = NoiseInjector(width, factor)
        self.act1 = BiasedActivation(inner)
        self.act2 = BiasedActivation(width)

    def forward(self, x: Tensor, a: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        """x, a: (N,W,H,W') -> (x', a'), both (N,W,H,W')."""
        y = self.act1(self.noise1(self.conv1(a), noise))  # (N, W/c, H, W')
        x = x + self.conv2(y)
        return x, self.act2(self.noise2(x, noise))


class GeneratorStage(nn.Module):
    """A run of GeneratorBlocks and the 1x1 projection of its output into the aggregated features."""

    def __init__(self, width: int, features: int, blocks: int, compression: int, k: int):
        super().__init__()
        self.blocks = nn.ModuleList(GeneratorBlock(width, compression, k) for _ in range(blocks))
        self.to_features = _conv1x1(width, features, 0.0)

    def forward(self, x: Tensor, a: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor, Tensor]:
        """x, a: (N,W,h,w) -> x', a' (N,W,h,w) and the feature residual (N,F0,h,w)."""
        for block in self.blocks:
            x, a = block(x, a, noise)
        return x, a, self.to_features(a)


class GeneratorStem(nn.Module):
    """conv(3 -> W) -> noise -> act, and a 1x1 projection of the activated maps into the features."""

    def __init__(self, width: int, features: int, k: int):
        super().__init__()
        self.conv = _conv(3, width, k, ACT_GAIN)
        self.noise = NoiseInjector(width, 1)
        self.act = BiasedActivation(width)
        self.to_features = _conv1x1(width, features, ACT_GAIN)

    def forward(self, y: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor, Tensor]:
        """y: (N,3,h,w) -> trunk x, activated a (N,W,h,w), features (N,F0,h,w)."""
        x = self.conv(y)
        a = self.act(self.noise(x, noise))
        return x, a, self.to_features(a)


class GeneratorUpsampleBlock(nn.Module):
    """x2 block: conv -> noise -> act -> 1x1 to 4C -> pixel shuffle + [1,2,1] blur -> noise -> act -> conv,
    added to the bilinear x2 of the (1x1-projected) input; then noise -> act."""

    def __init__(self, cin: int, cout: int, compression: int, k: int, factor: int):
        super().__init__()
        inner = cin // compression
        self.conv1 = _conv(cin, inner, k, ACT_GAIN)
        self.conv2 = _conv1x1(inner, 4 * inner, ACT_GAIN)
        self.conv3 = _conv(inner, cout, k, 0.0)
        self.noise1 = NoiseInjector(inner, factor)  # at the input resolution
        self.noise2 = NoiseInjector(inner, 2 * factor)  # after the x2
        self.noise3 = NoiseInjector(cout, 2 * factor)
        self.act1 = BiasedActivation(inner)
        self.act2 = BiasedActivation(inner)
        self.act3 = BiasedActivation(cout)
        self.shortcut = _conv1x1(cin, cout, 1.0) if cin != cout else None

    def forward(self, x: Tensor, a: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        """x, a: (N,Cin,H,W) -> x', a' (N,Cout,2H,2W)."""
        if self.shortcut is not None:
            x = self.shortcut(x)  # (N, Cout, H, W)
        y = self.conv2(self.act1(self.noise1(self.conv1(a), noise)))  # (N, 4I, H, W)
        y = _lowpass(F.pixel_shuffle(y, 2))  # (N, I, 2H, 2W)
        y = self.conv3(self.act2(self.noise2(y, noise)))  # (N, Cout, 2H, 2W)
        x = _bilinear_x2(x) + y
        return x, self.act3(self.noise3(x, noise))


class CriticBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(conv(act(x)))), no noise."""

    def __init__(self, width: int, compression: int, k: int):
        super().__init__()
        inner = width // compression
        self.conv1 = _conv(width, inner, k, ACT_GAIN)
        self.conv2 = _conv(inner, width, k, 0.0)
        self.act1 = BiasedActivation(width)
        self.act2 = BiasedActivation(inner)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,W,H,W') -> (N,W,H,W')."""
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class CriticDownsampleBlock(nn.Module):
    """x2 down: act -> conv -> act -> blur + pixel unshuffle -> 1x1 -> act -> conv, added to an
    anti-aliased bilinear x0.5 shortcut (1x1-projected when the width changes)."""

    def __init__(self, cin: int, cout: int, compression: int, k: int):
        super().__init__()
        inner = cout // compression
        self.conv1 = _conv(cin, inner, k, ACT_GAIN)
        self.conv2 = _conv1x1(4 * inner, inner, ACT_GAIN)
        self.conv3 = _conv(inner, cout, k, 0.0)
        self.act1 = BiasedActivation(cin)
        self.act2 = BiasedActivation(inner)
        self.act3 = BiasedActivation(inner)
        self.shortcut = _conv1x1(cin, cout, 1.0) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,Cin,H,W), H and W even -> (N,Cout,H/2,W/2)."""
        y = self.act2(self.conv1(self.act1(x)))  # (N, I, H, W)
        y = F.pixel_unshuffle(_lowpass(y), 2)  # (N, 4I, H/2, W/2)
        y = self.conv3(self.act3(self.conv2(y)))  # (N, Cout, H/2, W/2)
        # torch has no CPU bf16 kernel for the anti-aliased resize: run it in float32 there.
        xs = x.float() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x
        x = F.interpolate(xs, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True,
                          recompute_scale_factor=True).to(x.dtype)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + y


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class Generator(nn.Module):
    """SRMAP generator: LR (N,3,h,w) in [0,1] -> SR (N,3,4h,4w), a learned residual over bilinear x2 x2."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        k, w, f = cfg.kernel_size, cfg.stem_width, cfg.feature_widths
        self.stem = GeneratorStem(w, f[0], k)
        self.stages = nn.ModuleList(GeneratorStage(w, f[0], n, cfg.compression, k) for n in cfg.blocks_per_stage)
        self.feature_noise = NoiseInjector(f[0], 1)
        self.feature_act = BiasedActivation(f[0])
        self.upsamplers = nn.ModuleList(
            GeneratorUpsampleBlock(f[i], f[i + 1], cfg.compression, k, 2**i) for i in range(len(f) - 1))
        self.to_rgb = nn.ModuleList(_conv1x1(f[i + 1], 3, 0.0) for i in range(len(f) - 1))
        # A constant, not state: kept out of checkpoints.
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1) * RGB_RANGE, persistent=False)
        for index, inj in enumerate(self.injectors()):
            inj.index = index

    def injectors(self) -> list[NoiseInjector]:
        """Every NoiseInjector in forward order (the paper generator has 136)."""
        return [m for m in self.modules() if isinstance(m, NoiseInjector)]

    def injector_groups(self) -> dict[str, list[NoiseInjector]]:
        """Injectors by place: stem, trunk (every block), features, and one group per upsample block (x2, x4)."""
        groups = {"stem": [self.stem.noise],
                  "trunk": [m for s in self.stages for m in s.modules() if isinstance(m, NoiseInjector)],
                  "features": [self.feature_noise]}
        for i, up in enumerate(self.upsamplers):
            groups[f"up_x{2 ** (i + 1)}"] = [up.noise1, up.noise2, up.noise3]
        return groups

    def noise_scale_means(self) -> dict[str, float]:
        """Mean |scale| over every channel of each injector group (see :meth:`injector_groups`)."""
        with torch.no_grad():
            return {name: float(torch.cat([m.scale.detach().abs().float().flatten() for m in inj]).mean())
                    for name, inj in self.injector_groups().items()}

    def set_noise_scales(self, value: float) -> None:
        """Set every injector's per-channel scale to ``value``."""
        with torch.no_grad():
            for m in self.injectors():
                m.scale.fill_(float(value))

    @property
    def receptive_radius(self) -> int:
        """LR pixels of context a tile needs on each side so tiled == whole image (float tolerance).

        An upper bound: the sum, in HR pixels, of the reach of every spatial op
        on the way from input to output (a k x k conv reaches k//2 pixels at its
        own resolution, the [1,2,1] blur and the bilinear x2 one pixel of their
        input), rounded up to LR pixels. Reflect padding and the bilinear edge
        clamp only differ from the whole image within this band.
        """
        cfg = self.cfg
        p = cfg.kernel_size // 2
        hr = 4 * p * (1 + 2 * sum(cfg.blocks_per_stage))  # stem + two convs per block, at LR
        for i in range(len(cfg.feature_widths) - 1):
            step = 4 // 2**i  # HR pixels per pixel at this block's input resolution
            hr += step * p + step  # conv1 at the input resolution; bilinear x2 of the shortcut
            hr += step // 2 * (1 + p) + step // 2  # blur and conv3 after the x2; the image's bilinear x2
        return -(-hr // 4)

    def forward(self, y: Tensor, seed: Any = None, noise_scale: float = 1.0,
                origin: tuple[int, int] = (0, 0)) -> Tensor:
        """y: LR float (N,3,h,w) in [0,1] -> SR (N,3,4h,4w) in [0,1] (not clamped).

        ``seed`` picks each image's noise (:mod:`srmap.noise`): an int (one key for
        every image), one int per image, or an int64 tensor (N,) of keys (training
        passes :func:`srmap.noise.training_keys`); None draws one fresh key per image
        from torch's global RNG. ``origin`` = (top, left) are the global LR
        coordinates of y[..., 0, 0], so a tile gets the noise of the same pixels
        of the whole image. ``noise_scale`` multiplies all noise; 0 gives the
        deterministic output. Raises ValueError for a bad input or seed.
        """
        if y.dim() != 4 or y.shape[1] != 3 or not y.is_floating_point():
            raise ValueError(
                f"Generator input: expected a float LR batch (N,3,h,w) in [0,1], got {y.dtype} {tuple(y.shape)}"
            )
        keys = None
        if noise_scale != 0:
            keys = (torch.randint(0, 2**62, (y.shape[0],), device=y.device) if seed is None
                    else seed_keys(seed, y.shape[0], y.device))
        noise = NoiseSource(keys, noise_scale, origin)
        img = y * RGB_RANGE - self.rgb_mean.to(y.dtype)  # (N,3,h,w), the authors' mean-shifted 0-255 input
        x, a, feats = self.stem(img, noise)  # (N,W,h,w) x2, (N,F0,h,w)
        for stage in self.stages:
            x, a, residual = stage(x, a, noise)
            feats = feats + residual
        a = self.feature_act(self.feature_noise(feats, noise))  # (N,F0,h,w)
        x = feats
        for up, to_rgb in zip(self.upsamplers, self.to_rgb):
            x, a = up(x, a, noise)  # (N,F_{i+1},2^(i+1) h, 2^(i+1) w)
            img = _bilinear_x2(img) + to_rgb(a)
        return (img + self.rgb_mean.to(img.dtype)) / RGB_RANGE  # (N,3,4h,4w)


class Critic(nn.Module):
    """SRMAP critic: HR patches (N,3,S,S) in [0,1] -> unbounded realness scores (N,) float32."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.cfg = cfg
        k, widths = cfg.kernel_size, cfg.stage_widths + (cfg.epilog_width,)
        self.from_rgb = _conv(3, widths[0], k, ACT_GAIN)
        self.stages = nn.ModuleList(
            nn.Sequential(CriticDownsampleBlock(widths[i], widths[i + 1], cfg.compression, k),
                          *(CriticBlock(widths[i + 1], cfg.compression, k) for _ in range(n - 1)))
            for i, n in enumerate(cfg.blocks_per_stage))
        # Epilog: act -> global depthwise conv (one basis x basis weighting per channel) -> linear -> act.
        w = cfg.epilog_width
        self.reduce = _msr(nn.Conv2d(w, w, cfg.basis_size, groups=w, bias=False), 1.0)
        self.fc = _msr(nn.Linear(w, cfg.latent_width, bias=False), ACT_GAIN)
        self.reduce_act = BiasedActivation(w)
        self.fc_act = BiasedActivation(cfg.latent_width)
        self.head = _msr(nn.Linear(cfg.latent_width, 1), 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: HR float (N,3,S,S) in [0,1] with S == cfg.in_size -> scores (N,) float32.

        The last linear layer runs in float32 even under autocast: scores reach
        magnitudes of about 100, where bf16 steps are 0.5.
        """
        s = self.cfg.in_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"Critic input: expected HR patches (N,3,{s},{s}) (critic in_size {s}), got shape {tuple(x.shape)}"
            )
        h = self.from_rgb(x * RGB_RANGE)  # (N, C0, S, S), the authors' 0-255 input
        for stage in self.stages:
            h = stage(h)  # (N, C, S/2^i, S/2^i)
        h = self.reduce(self.reduce_act(h)).flatten(1)  # (N, E)
        h = self.fc_act(self.fc(h))  # (N, L)
        plain = torch.autocast(h.device.type, enabled=False) if h.device.type in ("cpu", "cuda") else nullcontext()
        with plain:
            return F.linear(h.float(), self.head.weight.float(), self.head.bias.float()).squeeze(1)  # (N,)


# ---------------------------------------------------------------------------
# Size and cost
# ---------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def flops_per_patch(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs (2 per multiply-add; convs, matmuls) for ONE input of shape (C,H,W) or (N,C,H,W).

    Counted with torch.utils.flop_counter on a meta-device copy, so nothing is
    computed and the module is untouched. Element-wise ops and the noise are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape: expected (C,H,W) or (N,C,H,W) with positive sizes, got {tuple(input_shape)}")
    meta = copy.deepcopy(module).to("meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        x = torch.empty(shape, device="meta")
        meta(x, noise_scale=0) if isinstance(meta, Generator) else meta(x)
    return counter.get_total_flops() // shape[0]


def _si(n: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def info_text(gen_cfg: GeneratorConfig, critic_cfg: CriticConfig, lr_patch: int = 48) -> str:
    """Human summary for ``srmap info``: parameters and forward FLOPs of both nets per LR training patch.

    The critic is counted on the HR patch made from one ``lr_patch`` x ``lr_patch``
    LR patch (its ``in_size``); both figures are per patch.
    """
    if isinstance(lr_patch, bool) or not isinstance(lr_patch, int) or lr_patch < 1:
        raise ValueError(f"lr_patch: expected a positive integer, got {lr_patch!r}")
    hr = gen_cfg.scale * lr_patch
    with torch.device("meta"):
        g, d = Generator(gen_cfg), Critic(critic_cfg)
    g_flops = flops_per_patch(g, (3, lr_patch, lr_patch))
    d_flops = flops_per_patch(d, (3, critic_cfg.in_size, critic_cfg.in_size))
    lines = [
        f"generator: {count_params(g):,} parameters; {_si(g_flops, 'FLOP')} forward per "
        f"{lr_patch}x{lr_patch} LR patch (-> {hr}x{hr}); {len(g.injectors())} noise injectors; "
        f"receptive radius {g.receptive_radius} LR px",
        f"critic:    {count_params(d):,} parameters; {_si(d_flops, 'FLOP')} forward per "
        f"{critic_cfg.in_size}x{critic_cfg.in_size} HR patch (one {critic_cfg.in_size // gen_cfg.scale}x"
        f"{critic_cfg.in_size // gen_cfg.scale} LR patch)",
    ]
    if critic_cfg.in_size != hr:
        lines.append(f"warning: critic in_size {critic_cfg.in_size} != {gen_cfg.scale} x lr_patch = {hr}")
    return "\n".join(lines)
