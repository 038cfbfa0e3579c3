"""srmap.noise: the one stateless noise function of training and sampling.

Its guarantees: every value is a pure function of (image key, injector, channel,
global pixel), so crops and tiles get the noise of the whole image and a sample
does not depend on its batch; the values are standard normal and uncorrelated
between neighbouring pixels, rows, channels, injectors and keys; the bank's
bytes are pinned. The training-side guarantees (bit-exact resume, the same
noise under 1 and 2 DDP processes) are in test_train.py and test_ddp.py, the
compiled step in test_compile.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import stats

from srmap import noise
from srmap.nets import Generator
from srmap.options import GeneratorConfig

TINY_G = GeneratorConfig(stem_width=8, feature_widths=(12, 8, 4), blocks_per_stage=(2, 2), compression=2)


def _lowbias32_reference(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32, whose multiplication wraps mod 2**32 natively."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def keys32(*keys: int) -> torch.Tensor:
    return noise.fold_keys(torch.tensor(keys, dtype=torch.int64))


def test_hash_matches_uint32_reference_and_leaves_its_input():
    values = np.random.default_rng(0).integers(0, 2**32, size=10_000, dtype=np.int64)
    values[:4] = [0, 1, 2**31, 2**32 - 1]
    x = torch.from_numpy(values.copy())
    got = noise.hash32(x)
    assert np.array_equal(got.numpy(), _lowbias32_reference(values).astype(np.int64))
    assert torch.equal(x, torch.from_numpy(values))
    assert torch.equal(noise.hash32(x + 2**32), got)  # only the low 32 bits count


def test_bank_is_pinned_and_standard_normal():
    bank = noise.bank()[: 1 << noise.BANK_BITS]
    assert hashlib.sha256(bank.numpy().tobytes()).hexdigest() == noise.BANK_SHA256
    assert torch.equal(noise.bank()[1 << noise.BANK_BITS:], bank[: noise.bank().numel() - bank.numel()])
    z = bank.double().numpy()
    assert len(np.unique(z)) > 4_000_000  # distinct values (float32 rounding merges a few)
    # moments of N(0, 1): mean 0, variance 1, skewness 0, excess kurtosis 0 (standard errors ~5e-4 .. 2.4e-3)
    assert abs(z.mean()) < 2e-3 and abs(z.var() - 1) < 3e-3
    assert abs(stats.skew(z)) < 5e-3 and abs(stats.kurtosis(z)) < 1e-2
    assert stats.kstest(z[::16], "norm").pvalue > 1e-3


def test_a_crop_gets_the_noise_of_the_same_pixels_of_the_whole_map():
    k = keys32(3, 2**40 + 7)
    whole = noise.noise_map(k, 5, 2, 0, 0, 30, 40)
    crop = noise.noise_map(k, 5, 2, 7, 11, 9, 13)
    assert torch.equal(crop, whole[:, :, 7:16, 11:24])
    assert torch.equal(noise.noise_map(k[1:], 5, 2, 0, 0, 30, 40), whole[1:])  # batch-independent
    # rows wider than the bank's wrap-around tail are read in pieces, with the same values
    wide = noise.noise_map(k[:1], 0, 1, 4, 0, 1, 70_000)
    assert torch.equal(noise.noise_map(k[:1], 0, 1, 4, 65_000, 1, 5_000), wide[..., 65_000:])


def test_maps_are_uncorrelated_across_pixels_rows_channels_injectors_and_keys():
    z = noise.noise_map(keys32(0, 1), 0, 4, 0, 0, 128, 128)  # 131072 values
    other = noise.noise_map(keys32(0, 1), 1, 4, 0, 0, 128, 128)
    flat = z.flatten().double()
    assert abs(flat.mean().item()) < 0.02 and abs(flat.std().item() - 1.0) < 0.02
    corr = lambda a, b: np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]  # noqa: E731
    assert abs(corr(z[:, :, :, :-1], z[:, :, :, 1:])) < 0.02  # horizontal neighbours
    assert abs(corr(z[:, :, :-1], z[:, :, 1:])) < 0.02  # vertical neighbours
    assert abs(corr(z[:, 0], z[:, 1])) < 0.02  # channels
    assert abs(corr(z[0], z[1])) < 0.02  # keys
    assert abs(corr(z, other)) < 0.02  # injectors
    # no row is a copy of its neighbour, shifted by up to 8 columns
    rows = z[0, 0]
    for d in range(-8, 9):
        a, b = rows[:-1, max(d, 0):128 + min(d, 0)], rows[1:, max(-d, 0):128 - max(d, 0)]
        assert abs(corr(a, b)) < 0.05, d


def test_seed_keys_accept_ints_lists_and_tensors_and_name_bad_seeds():
    assert noise.seed_keys(7, 3).tolist() == [7, 7, 7]
    assert noise.seed_keys([1, 2], 2).tolist() == [1, 2]
    t = torch.tensor([5, 6])
    assert noise.seed_keys(t, 2) is t
    for bad, match in ((-1, r"\[0, 2\*\*63\)"), ([1, 2, 3], "3 seeds for a batch of 2"), ("7", "expected None"),
                       (True, "expected None"), (torch.tensor([1.0, 2.0]), "int64 tensor")):
        with pytest.raises(ValueError, match=match):
            noise.seed_keys(bad, 2)
    assert noise.training_keys(3, torch.tensor([0, 9])).tolist() == [3 << 32, (3 << 32) + 9]


def test_generator_noise_follows_the_key_not_the_batch():
    torch.manual_seed(0)
    g = Generator(TINY_G).eval()
    with torch.no_grad():  # zero-initialised branches would hide the noise
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g.set_noise_scales(10.0)
    y = torch.rand(3, 3, 11, 13)
    keys = noise.training_keys(1, torch.tensor([4, 5, 6]))
    with torch.no_grad():
        batch = g(y, seed=keys)
        alone = g(y[1:2], seed=keys[1:2])
        again = g(y, seed=keys)
        other = g(y, seed=noise.training_keys(2, torch.tensor([4, 5, 6])))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch, again) and (batch - other).abs().max() > 1e-3
