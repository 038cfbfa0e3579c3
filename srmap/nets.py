"""The SRMAP networks: a noise-injected 4x generator and an anti-aliased residual critic.

Architecture, every interpretation of the report's appendix, the position-keyed
noise hash and the initialisation are documented in ``docs/model.md``.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Slopes of the two activations. The generator uses ReLU because it is idempotent:
# with the activation after the residual sum, a block whose branch is zero maps its
# (already non-negative) input to itself exactly. The critic uses the StyleGAN2 leaky
# ReLU so that neither the generator's adversarial gradient nor the R1 penalty
# passes through dead units.
GENERATOR_SLOPE = 0.0
CRITIC_SLOPE = 0.2

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # separates the two uniform streams of Box-Muller


# ---------------------------------------------------------------------------
# Position-keyed noise
# ---------------------------------------------------------------------------


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x, c < 2**32, without ever exceeding int64.

    The constant is split into 16-bit halves so every partial product stays below
    2**48: signed int64 overflow is undefined behaviour in the C++ kernels.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x):
    """Wellons' "lowbias32" integer hash of ``x mod 2**32``; returns values in [0, 2**32).

    Works elementwise on int64 tensors (input left untouched) and on Python ints
    (the same arithmetic), so the scalar key of (seed, layer) and the per-pixel
    keys share one definition.
    """
    if isinstance(x, Tensor):
        return _hash32_(x & _M32)
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32_(x: Tensor, c: int, tmp: Tensor) -> Tensor:
    """In-place ``_mul32`` on an int64 tensor, using ``tmp`` as scratch."""
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _hash32_(x: Tensor) -> Tensor:
    """``hash32`` in place on an int64 tensor already in [0, 2**32).

    In-place with one scratch buffer: on CPU the allocations of the out-of-place
    form (about 20 full-size temporaries) cost several times the arithmetic.
    """
    tmp = torch.empty_like(x)
    for shift, const in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        _mul32_(x, const, tmp)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _seed_key(seed: int) -> int:
    """Fold a non-negative seed below 2**63 into a 32-bit key."""
    return hash32(hash32(seed & _M32) + (seed >> 32))


def hash_normal(
    seeds: Sequence[int],
    layers: int,
    top: int,
    left: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard-normal noise keyed by position: float32 (len(seeds), layers, height, width).

    Entry [s, l, i, j] is a pure function of (seeds[s], l, top + i, left + j): a
    counter-based hash of the key gives two 23-bit uniforms in (0, 1), which
    Box-Muller turns into one N(0, 1) value (tails cut at about 5.7 sigma). Any
    crop of a large map therefore equals the map of the crop's own coordinates.
    """
    base = [[hash32(_seed_key(s) + layer) for layer in range(layers)] for s in seeds]
    key = torch.tensor(base, dtype=torch.int64, device=device)[:, :, None, None]  # (S, L, 1, 1)
    rows = torch.arange(top, top + height, dtype=torch.int64, device=device)[:, None]  # (H, 1)
    cols = torch.arange(left, left + width, dtype=torch.int64, device=device)  # (W,)
    key = _hash32_((hash32(key + rows) + cols).bitwise_and_(_M32))  # (S, L, H, W)
    other = _hash32_((key + _GOLDEN32).bitwise_and_(_M32))
    scale = 2.0**-23
    # In place from here on: these maps are the size of all layers' noise.
    radius = key.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(scale).log_().mul_(-2.0).sqrt_()
    angle = other.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(2.0 * math.pi * scale)
    return radius.mul_(angle.cos_())


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _int_tuple(value: Any, name: str, length: int | None = None, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a list of positive integers, got {value!r}")
    out = tuple(_pos_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} entries, got {len(out)} ({list(out)})")
    if not out and not allow_empty:
        raise ValueError(f"{name}: expected at least one entry, got an empty list")
    return out


def _odd_kernel(value: Any, name: str) -> int:
    k = _pos_int(value, name)
    if k % 2 == 0:
        raise ValueError(f"{name}: expected an odd kernel size (symmetric 'same' padding), got {k}")
    return k


def _check_generator(v: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {
        "stem_width": _pos_int(v["stem_width"], prefix + "stem_width"),
        "feature_widths": _int_tuple(v["feature_widths"], prefix + "feature_widths", length=3),
        "stages": _pos_int(v["stages"], prefix + "stages"),
        "blocks_per_stage": _pos_int(v["blocks_per_stage"], prefix + "blocks_per_stage"),
        "compression": _pos_int(v["compression"], prefix + "compression"),
        "kernel_size": _odd_kernel(v["kernel_size"], prefix + "kernel_size"),
        "scale": v["scale"],
    }
    noise = v["noise_init"]
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"{prefix}noise_init: expected a finite number >= 0, got {noise!r}")
    out["noise_init"] = float(noise)
    scale = out["scale"]
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale != 4:
        raise ValueError(f"{prefix}scale: only 4 is supported (two x2 upsample blocks), got {scale!r}")
    if out["stem_width"] < out["compression"]:
        raise ValueError(
            f"{prefix}compression: {out['compression']} leaves no inner channels "
            f"for stem_width {out['stem_width']} (inner width = stem_width // compression)"
        )
    return out


def _check_critic(v: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {
        "in_size": _pos_int(v["in_size"], prefix + "in_size"),
        "widths": _int_tuple(v["widths"], prefix + "widths"),
        "blocks_per_stage": _pos_int(v["blocks_per_stage"], prefix + "blocks_per_stage"),
        "compression": _pos_int(v["compression"], prefix + "compression"),
        "kernel_size": _odd_kernel(v["kernel_size"], prefix + "kernel_size"),
        "fc_widths": _int_tuple(v["fc_widths"], prefix + "fc_widths", allow_empty=True),
    }
    factor = 2 ** len(out["widths"])
    if out["in_size"] % factor:
        raise ValueError(
            f"{prefix}in_size: {out['in_size']} is not divisible by 2**{len(out['widths'])} = {factor} "
            f"(one x2 downsampling per entry of widths)"
        )
    too_narrow = [w for w in out["widths"] if w < out["compression"]]
    if too_narrow:
        raise ValueError(
            f"{prefix}compression: {out['compression']} leaves no inner channels for width {too_narrow[0]}"
        )
    return out


@dataclass(frozen=True)
class GeneratorConfig:
    """Generator hyper-parameters (paper defaults, report Table 1); validated on construction."""

    stem_width: int = 256  # channels of the LR trunk (the report's "Stem Width" = stage input size)
    feature_widths: tuple[int, ...] = (512, 256, 128)  # [summed stage output, x2 upsample out, x4 upsample out]
    stages: int = 4  # stages of residual blocks; each stage's output is projected and summed
    blocks_per_stage: int = 16  # residual blocks per stage (noise-injected)
    compression: int = 4  # block inner width = stem_width // compression
    kernel_size: int = 3  # kernel of every block and upsample conv (the report's "Receptive Field")
    noise_init: float = 0.05  # initial value of every per-channel noise weight
    scale: int = 4  # magnification; fixed at 4 (two x2 upsample blocks)

    def __post_init__(self) -> None:
        checked = _check_generator({f.name: getattr(self, f.name) for f in fields(self)}, "GeneratorConfig.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # lists from YAML become tuples

    @property
    def noise_layers(self) -> int:
        """Number of noise-injection layers (one per trunk block)."""
        return self.stages * self.blocks_per_stage


@dataclass(frozen=True)
class CriticConfig:
    """Critic hyper-parameters (paper defaults); validated on construction."""

    in_size: int = 192  # side of the square HR patches it scores (4 x the LR training patch)
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # stem width = widths[0]; one stage (x2 down + blocks) per entry
    blocks_per_stage: int = 2  # residual blocks after each downsampling
    compression: int = 4  # block inner width = stage width // compression
    kernel_size: int = 3  # kernel of the stem and block convs
    fc_widths: tuple[int, ...] = (512,)  # hidden fully connected layers before the 1-unit score (may be empty)

    def __post_init__(self) -> None:
        checked = _check_critic({f.name: getattr(self, f.name) for f in fields(self)}, "CriticConfig.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def final_size(self) -> int:
        """Spatial side of the feature map that the global depthwise conv reduces."""
        return self.in_size // 2 ** len(self.widths)


def _from_mapping(cls, d: Mapping, where: str, optional: set[str]):
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(d).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected keys: {', '.join(names)})")
    missing = [n for n in names if n not in d and n not in optional]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")
    values = {f.name: d.get(f.name, f.default) for f in fields(cls)}
    checker = _check_generator if cls is GeneratorConfig else _check_critic
    return cls(**checker(values, where + "."))


def generator_config(d: Mapping, where: str = "model.generator") -> GeneratorConfig:
    """GeneratorConfig from a params.yaml mapping (lists become tuples; ``scale`` optional).

    An unknown, missing or invalid key raises ValueError naming ``where.<key>``.
    """
    return _from_mapping(GeneratorConfig, d, where, optional={"scale"})


def critic_config(d: Mapping, where: str = "model.critic") -> CriticConfig:
    """CriticConfig from a params.yaml mapping (all keys required; lists become tuples)."""
    return _from_mapping(CriticConfig, d, where, optional=set())


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _he_(layer: nn.Conv2d | nn.Linear, slope: float | None) -> None:
    """He (fan-in) normal init for a layer followed by leaky ReLU(slope); None = linear (gain 1)."""
    if slope is None:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="linear")
    else:
        nn.init.kaiming_normal_(layer.weight, a=slope, mode="fan_in", nonlinearity="leaky_relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _zero_(layer: nn.Conv2d | nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def _act(slope: float) -> nn.Module:
    return nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)


class NoiseInjection(nn.Module):
    """Adds a single-channel noise map times a learned per-channel weight (StyleGAN)."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))

    def forward(self, h: Tensor, noise: Tensor | None) -> Tensor:
        """h: (N,C,H,W); noise: (N or 1, 1, H, W) or None (no noise) -> (N,C,H,W)."""
        if noise is None:
            return h
        return h + (self.weight * noise).to(h.dtype)  # cast keeps bf16 activations bf16


class ResidualBlock(nn.Module):
    """conv -> [noise] -> act -> conv -> + input -> act; the second conv starts at zero.

    At init the branch is zero, so the block returns act(x): exactly x for the
    generator's ReLU on its non-negative trunk.
    """

    def __init__(self, width: int, compression: int, kernel_size: int, slope: float, noise_init: float | None):
        super().__init__()
        inner = width // compression
        self.conv1 = _conv(width, inner, kernel_size)
        self.noise = NoiseInjection(inner, noise_init) if noise_init is not None else None
        self.conv2 = _conv(inner, width, kernel_size)
        self.act = _act(slope)
        _he_(self.conv1, slope)
        _zero_(self.conv2)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """x: (N,W,H,W') -> (N,W,H,W'); noise: (N or 1,1,H,W') or None."""
        h = self.conv1(x)  # (N, W/c, H, W')
        if self.noise is not None:
            h = self.noise(h, noise)
        h = self.conv2(self.act(h))  # (N, W, H, W')
        return self.act(x + h)


class SubpixelUpsample(nn.Module):
    """x2 upsampling: conv to 4x channels -> pixel shuffle -> ReLU (ICNR init, no checkerboard at init)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__()
        self.conv = _conv(cin, 4 * cout, kernel_size)
        self.act = _act(GENERATOR_SLOPE)
        # ICNR (Aitken et al. 2017): the four sub-pixel filters of each output channel
        # start equal, so the block starts as nearest-neighbour x2 of one conv.
        base = _conv(cin, cout, kernel_size)
        _he_(base, GENERATOR_SLOPE)
        with torch.no_grad():
            self.conv.weight.copy_(base.weight.repeat_interleave(4, dim=0))
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,Cin,H,W) -> (N,Cout,2H,2W)."""
        return self.act(F.pixel_shuffle(self.conv(x), 2))


class LowpassDown(nn.Module):
    """Anti-aliased x2 downsampling: separable binomial [1,2,1]/4 low-pass, reflect pad, stride 2;
    then a 1x1 conv when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        # A fixed filter, not state: kept out of checkpoints.
        self.register_buffer("taps", taps, persistent=False)
        self.channels = cin
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None
        if self.proj is not None:
            _he_(self.proj, None)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,Cin,H,W), H and W even -> (N,Cout,H/2,W/2)."""
        c = self.channels
        taps = self.taps.to(x.dtype)
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = F.conv2d(x, taps.view(1, 1, 3, 1).expand(c, 1, 3, 1), stride=(2, 1), groups=c)  # (N,C,H/2,W+2)
        x = F.conv2d(x, taps.view(1, 1, 1, 3).expand(c, 1, 1, 3), stride=(1, 2), groups=c)  # (N,C,H/2,W/2)
        return x if self.proj is None else self.proj(x)


def _bilinear_x2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------


def _seed_list(seed: Any, batch: int) -> list[int]:
    if isinstance(seed, Tensor):
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = [int(seed)]
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch} (give one int, or one per image)")
    else:
        raise ValueError(f"seed: expected None, an int or a sequence of ints, got {seed!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < 2**63:
            raise ValueError(f"seed: expected integers in [0, 2**63), got {s!r}")
    return [int(s) for s in seeds]


class Generator(nn.Module):
    """SRMAP generator: LR (N,3,h,w) in [0,1] -> SR (N,3,4h,4w), a learned residual over bilinear x2 x2."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        k, w = cfg.kernel_size, cfg.stem_width
        f0, f1, f2 = cfg.feature_widths
        self.stem = _conv(3, w, k)
        self.act = _act(GENERATOR_SLOPE)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                ResidualBlock(w, cfg.compression, k, GENERATOR_SLOPE, cfg.noise_init)
                for _ in range(cfg.blocks_per_stage)
            )
            for _ in range(cfg.stages)
        )
        self.projections = nn.ModuleList(nn.Conv2d(w, f0, 1) for _ in range(cfg.stages))
        self.up1 = SubpixelUpsample(f0, f1, k)
        self.up2 = SubpixelUpsample(f1, f2, k)
        self.to_rgb_x2 = nn.Conv2d(f1, 3, 1)
        self.to_rgb_x4 = nn.Conv2d(f2, 3, 1)

        _he_(self.stem, GENERATOR_SLOPE)
        for p in self.projections:
            _he_(p, None)
            # The stage outputs are summed: scale so the sum has the variance of one.
            with torch.no_grad():
                p.weight.mul_(cfg.stages**-0.5)
        _zero_(self.to_rgb_x2)
        _zero_(self.to_rgb_x4)

    @property
    def receptive_radius(self) -> int:
        """LR pixels of context a tile needs on each side so tiled == whole image (float tolerance).

        Counted in HR pixels along the longest path, then rounded up to LR pixels:
        stem + 2 convs per block + first upsample conv at LR (4 HR px per tap
        radius each), the second upsample conv at x2 (2 HR px per tap radius).
        The bilinear x2 of the x2 RGB image (1 px at x2 = 2 HR px) is never longer.
        """
        cfg = self.cfg
        p = cfg.kernel_size // 2
        lr_convs = 1 + 2 * cfg.stages * cfg.blocks_per_stage + 1
        hr = 4 * p * lr_convs + max(2 * p, 2)
        return -(-hr // 4)

    def noise(self, y: Tensor, seed: Any, noise_scale: float, origin: tuple[int, int]) -> Tensor | None:
        """Noise maps for every layer: (N or 1, L, h, w) float32, or None when noise_scale == 0."""
        if noise_scale == 0:
            return None
        n, _, h, w = y.shape
        layers = self.cfg.noise_layers
        if seed is None:
            z = torch.randn((n, layers, h, w), device=y.device, dtype=torch.float32)
        else:
            top, left = (int(v) for v in origin)
            z = hash_normal(_seed_list(seed, n), layers, top, left, h, w, y.device)
        return z if noise_scale == 1 else z * float(noise_scale)

    def forward(self, y: Tensor, seed=None, noise_scale: float = 1.0, origin: tuple[int, int] = (0, 0)) -> Tensor:
        """y: LR float (N,3,h,w) in [0,1] -> SR (N,3,4h,4w) (not clamped).

        seed=None: fresh noise from torch's global RNG (training; reproducible under
        torch.manual_seed). seed=int (or one int per image): position-keyed hash noise,
        a pure function of (seed, layer index, global LR pixel (row, col)), where
        origin=(top, left) are the global LR coordinates of y[..., 0, 0], so a tile
        gets the same noise as the whole image. noise_scale multiplies all noise;
        0 gives the deterministic output.
        """
        if y.dim() != 4 or y.shape[1] != 3 or not y.is_floating_point():
            raise ValueError(
                f"Generator input: expected a float LR batch (N,3,h,w) in [0,1], got {y.dtype} {tuple(y.shape)}"
            )
        z = self.noise(y, seed, noise_scale, origin)  # (N|1, L, h, w) or None
        x = self.act(self.stem(y))  # (N, W, h, w), non-negative
        trunk = 0
        layer = 0
        for stage, proj in zip(self.stages, self.projections):
            for block in stage:
                x = block(x, None if z is None else z[:, layer : layer + 1])
                layer += 1
            trunk = trunk + proj(x)  # (N, F0, h, w)
        f2 = self.up1(trunk)  # (N, F1, 2h, 2w)
        f4 = self.up2(f2)  # (N, F2, 4h, 4w)
        img = _bilinear_x2(y) + self.to_rgb_x2(f2)  # (N, 3, 2h, 2w)
        return _bilinear_x2(img) + self.to_rgb_x4(f4)  # (N, 3, 4h, 4w)


# ---------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------


class Discriminator(nn.Module):
    """SRMAP critic: HR patches (N,3,S,S) in [0,1] -> unbounded realness scores (N,)."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.kernel_size
        self.stem = _conv(3, cfg.widths[0], k)
        self.act = _act(CRITIC_SLOPE)
        _he_(self.stem, CRITIC_SLOPE)
        stages = []
        cin = cfg.widths[0]
        for width in cfg.widths:
            blocks = [ResidualBlock(width, cfg.compression, k, CRITIC_SLOPE, None) for _ in range(cfg.blocks_per_stage)]
            stages.append(nn.Sequential(LowpassDown(cin, width), *blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        side = cfg.final_size
        # Global depthwise conv: one learned side x side spatial weighting per channel.
        self.reduce = nn.Conv2d(cin, cin, side, groups=cin)
        _he_(self.reduce, None)
        head: list[nn.Module] = []
        for width in cfg.fc_widths:
            fc = nn.Linear(cin, width)
            _he_(fc, CRITIC_SLOPE)
            head += [fc, _act(CRITIC_SLOPE)]
            cin = width
        out = nn.Linear(cin, 1)
        _he_(out, None)
        self.head = nn.Sequential(*head, out)

    def forward(self, x: Tensor) -> Tensor:
        """x: HR float (N,3,S,S) in [0,1] with S == cfg.in_size -> scores (N,)."""
        s = self.cfg.in_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"Discriminator input: expected HR patches (N,3,{s},{s}) (critic in_size {s}), "
                f"got shape {tuple(x.shape)}"
            )
        h = self.stages(self.act(self.stem(x)))  # (N, C, S/2^k, S/2^k)
        h = self.reduce(h).flatten(1)  # (N, C)
        return self.head(h).squeeze(1)  # (N,)


# ---------------------------------------------------------------------------
# Size and cost
# ---------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def flops_per_patch(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs (2 per multiply-add; convs, matmuls) for ONE input of shape (C,H,W) or (N,C,H,W).

    Counted with torch.utils.flop_counter on a meta-device copy, so nothing is
    computed and the module is untouched. Element-wise ops are not counted.
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
        meta(torch.empty(shape, device="meta"))
    return counter.get_total_flops() // shape[0]


def _si(n: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def info_text(gen_cfg: GeneratorConfig, critic_cfg: CriticConfig, lr_patch: int) -> str:
    """Human summary for ``srmap info``: parameters and forward FLOPs per patch of both nets."""
    lr_patch = _pos_int(lr_patch, "lr_patch")
    hr = gen_cfg.scale * lr_patch
    with torch.device("meta"):
        g, d = Generator(gen_cfg), Discriminator(critic_cfg)
    g_flops = flops_per_patch(g, (3, lr_patch, lr_patch))
    d_flops = flops_per_patch(d, (3, critic_cfg.in_size, critic_cfg.in_size))
    lines = [
        f"generator: {count_params(g):,} parameters; {_si(g_flops, 'FLOP')} forward per "
        f"{lr_patch}x{lr_patch} LR patch (-> {hr}x{hr}); {gen_cfg.noise_layers} noise layers; "
        f"receptive radius {g.receptive_radius} LR px",
        f"critic:    {count_params(d):,} parameters; {_si(d_flops, 'FLOP')} forward per "
        f"{critic_cfg.in_size}x{critic_cfg.in_size} HR patch",
    ]
    if critic_cfg.in_size != hr:
        lines.append(f"warning: critic in_size {critic_cfg.in_size} != {gen_cfg.scale} x lr_patch = {hr}")
    return "\n".join(lines)
