"""The generator's noise: one stateless function of (image key, injector, channel, global pixel).

Every value the generator's noise injectors add is a pure function of

    (image key, injector index, channel, global row, global column)

at that injector's resolution, so a sample is the same whatever batch, tile,
process, DataLoader worker or resume it is made in. At sampling time the image
key is the sample's seed; in training it is the sample's global index in the
run's patch stream (step x global batch + position) folded with the run seed
(:func:`training_keys`).

How a value is made (ours; docs/model.md):

* a fixed bank of ``2**BANK_BITS`` standard-normal float32 values, built once per
  process and device from the counter-based integer hash :func:`hash32`
  (Wellons' "lowbias32") and Box-Muller on two 24-bit uniforms, float64, rounded
  to float32 (|z| <= 5.1 in this bank; ``BANK_SHA256`` pins its bytes);
* for each (key, injector, channel, row) a 22-bit start offset, the hash of
  the four chained; the row's values are the bank read from that offset plus
  the global column (wrapping around the bank).

The hash runs only on the small (N, C, H) tensor of row offsets; the full
(N, C, H, W) map is one copy of bank slices, so noise costs about a memory
write per value. Neighbouring rows, channels, injectors and images read from
independent offsets; two rows share values (shifted) only when their offsets
fall within a row's width of each other.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

BANK_BITS = 22  # the bank holds 2**22 N(0, 1) values (4,076,363 distinct float32 numbers), 16 MiB
# SHA-256 of the bank's float32 bytes (little-endian), pinned so that a seed's samples never change silently.
BANK_SHA256 = "6a80dadcccae596955716262f7f828e90fbc77ab8779a8e8924e004b4ac1f213"
_WRAP = 1 << 16  # bank entries repeated past its end, so a slice of up to this many columns never wraps
_M32 = 0xFFFFFFFF
_BANKS: dict[str, Tensor] = {}  # device -> bank with its wrap-around tail, built on first use


def _mul32_(x: Tensor, c: int, tmp: Tensor) -> Tensor:
    """``x = (x * c) mod 2**32`` in place on int64 ``x`` in [0, 2**32), ``0 <= c < 2**32``.

    The constant is split into 16-bit halves so that no partial product
    reaches 2**63 (signed overflow is undefined in the C++ kernels).
    """
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def hash32(x: Tensor) -> Tensor:
    """Wellons' "lowbias32" integer hash of ``x mod 2**32``, elementwise; int64 in, int64 in [0, 2**32) out.

    (github.com/skeeto/hash-prospector, the 2-round 32-bit hash with bias
    0.17.) ``x`` is left untouched.
    """
    x = x.bitwise_and(_M32)
    tmp = torch.empty_like(x)
    for shift, const in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        _mul32_(x, const, tmp)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _make_bank() -> Tensor:
    """The 2**BANK_BITS standard-normal values, float32 on the CPU (about 0.2 s)."""
    pairs = torch.arange(1 << (BANK_BITS - 1), dtype=torch.int64)
    u = [hash32(pairs * 2 + i).bitwise_right_shift_(8).double().add_(0.5).mul_(2.0**-24) for i in (0, 1)]
    radius = u[0].log_().mul_(-2.0).sqrt_()
    angle = u[1].mul_(2.0 * math.pi)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1).flatten().float()


def bank(device: torch.device | str = "cpu") -> Tensor:
    """The bank on ``device`` followed by its first 2**16 values again: float32, (2**BANK_BITS + 2**16,).

    Built once per process and device; do not modify it.
    """
    key = str(torch.device(device))
    if key not in _BANKS:
        cpu = _BANKS.get("cpu")
        if cpu is None:
            values = _make_bank()
            cpu = _BANKS["cpu"] = torch.cat([values, values[:_WRAP]])
        _BANKS[key] = cpu if key == "cpu" else cpu.to(key)
    return _BANKS[key]


def fold_keys(keys: Tensor) -> Tensor:
    """64-bit image keys (int64 in [0, 2**63)) -> 32-bit keys (int64 in [0, 2**32)): hash(hash(low) + high)."""
    return hash32(hash32(keys) + (keys >> 32))


def noise_map(keys32: Tensor, injector: int, channels: int, top: int, left: int, height: int,
              width: int) -> Tensor:
    """Standard-normal noise (N, channels, height, width), float32 on ``keys32``'s device.

    ``keys32`` is (N,) int64 from :func:`fold_keys`; entry [n, c, i, j] is a pure
    function of (keys32[n], injector, c, top + i, left + j), so any crop of a
    large map equals the map of the crop's own coordinates.
    """
    device = keys32.device
    k = hash32(keys32 + injector)  # (N,)
    k = hash32(k[:, None] + torch.arange(channels, device=device))  # (N, C)
    rows = torch.arange(top, top + height, device=device)
    start = hash32(k[:, :, None] + rows).bitwise_right_shift_(32 - BANK_BITS)  # (N, C, H), in [0, 2**BANK_BITS)
    values = bank(device)
    pieces = []
    for c0 in range(0, width, _WRAP):  # one piece unless a row is wider than 65,536 px
        w = min(_WRAP, width - c0)
        first = (start + (left + c0)).bitwise_and_((1 << BANK_BITS) - 1).flatten()  # (N*C*H,)
        pieces.append(values.unfold(0, w, 1)[first].view(keys32.shape[0], channels, height, w))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3)


def training_keys(seed: int, indices: Tensor) -> Tensor:
    """Image keys of training samples: the run ``seed`` (in [0, 2**31)) in the high bits, the sample's
    global index (int64 (N,), in [0, 2**32)) in the low ones."""
    return indices.to(torch.int64) + (int(seed) << 32)


def seed_keys(seed: Any, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """The image keys of a sampling call: int64 (batch,) on ``device``.

    ``seed`` is an int (the same key for every image), a sequence of ``batch``
    ints, or an int64 tensor of ``batch`` keys (already on ``device``); every
    key in [0, 2**63). Raises ValueError otherwise.
    """
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.shape != (batch,):
            raise ValueError(f"seed: expected an int64 tensor of shape ({batch},), got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        return seed.to(device)
    if isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed] * batch
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch} (give one int, or one per image)")
    else:
        raise ValueError(f"seed: expected None, an int or a sequence of ints, got {seed!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seed: expected integers in [0, 2**63), got {s!r}")
    return torch.tensor(seeds, dtype=torch.int64, device=device)


class NoiseSource:
    """What one generator forward pass draws its noise from; every injector asks :meth:`sample`.

    ``keys``: int64 (N,) image keys on the activations' device (None: no noise).
    ``scale`` multiplies every map. ``origin`` = global LR (top, left) of the
    input's pixel [0, 0]: an injector at ``factor`` x LR resolution reads the
    noise of global pixels (top * factor + i, left * factor + j).
    """

    def __init__(self, keys: Tensor | None, scale: float, origin: tuple[int, int] = (0, 0)):
        self.keys32 = None if keys is None or scale == 0 else fold_keys(keys)
        self.scale, self.origin = float(scale), (int(origin[0]), int(origin[1]))

    def sample(self, h: Tensor, injector: int, factor: int) -> Tensor | None:
        """Noise for activation ``h`` (N, C, H, W): float32 of its shape, or None (no noise)."""
        if self.keys32 is None:
            return None
        n, c, height, width = h.shape
        z = noise_map(self.keys32, injector, c, self.origin[0] * factor, self.origin[1] * factor, height, width)
        return z if self.scale == 1 else z * self.scale
