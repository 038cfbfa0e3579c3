"""MATLAB-exact bicubic imresize: kernel, borders, per-pass uint8 rounding, torch path."""

import math

import numpy as np
import pytest
import torch

from srmap.resize import contributions, imresize, mod_crop, weight_matrix


def _reference(img: np.ndarray, scale: float, rounding: str) -> np.ndarray:
    """Slow MATLAB imresize(img, scale, 'bicubic') written tap by tap (1-based, as in imresize.m)."""

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return 1.5 * t**3 - 2.5 * t**2 + 1
        if t <= 2:
            return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
        return 0.0

    def resize_axis(a, out_len):
        n = a.shape[0]
        width = 4 / scale if scale < 1 else 4
        out = np.zeros((out_len,) + a.shape[1:])
        for x in range(1, out_len + 1):
            u = x / scale + 0.5 * (1 - 1 / scale)
            left = math.floor(u - width / 2)
            taps = [left + p for p in range(math.ceil(width) + 2)]
            w = [scale * kernel(scale * (u - j)) if scale < 1 else kernel(u - j) for j in taps]
            w = [v / sum(w) for v in w]
            acc = 0.0
            for wj, j in zip(w, taps):
                k = (j - 1) % (2 * n)  # mirror: 0..n-1 then n-1..0
                acc = acc + wj * a[k if k < n else 2 * n - 1 - k].astype(np.float64)
            out[x - 1] = acc
        if img.dtype == np.uint8:
            out = np.clip(out, 0, 255)
            out = np.rint(out) if rounding == "half_even" else np.floor(out + 0.5)
            out = out.astype(np.uint8)
        return out

    rows = resize_axis(img, math.ceil(scale * img.shape[0]))
    return np.swapaxes(resize_axis(np.swapaxes(rows, 0, 1), math.ceil(scale * img.shape[1])), 0, 1)


# Intermediate values above 255 are clipped and x.5 ties rounded after the first pass.
CRAFTED = np.array([[192, 128, 128, 255],
                    [64, 255, 192, 0],
                    [64, 255, 128, 0],
                    [192, 192, 255, 0]], dtype=np.uint8)


@pytest.mark.parametrize("scale", [0.25, 0.5, 1 / 3, 0.75, 2.0])
def test_constant_image_stays_constant(scale):
    img = np.full((13, 22, 3), 173, np.uint8)
    assert np.array_equal(imresize(img, scale), np.full_like(imresize(img, scale), 173))
    flt = np.full((13, 22), 0.37)
    np.testing.assert_allclose(imresize(flt, scale), 0.37, rtol=0, atol=1e-12)


def test_quarter_of_linear_ramp_away_from_borders():
    i, j = np.mgrid[0:64, 0:48].astype(np.float64)
    ramp = 2.0 * i + 3.0 * j + 5.0
    out = imresize(ramp, 0.25)
    assert out.shape == (16, 12)
    oi, oj = np.mgrid[0:16, 0:12].astype(np.float64)
    # output k samples input coordinate 4k + 1.5 (0-based); the kernel reaches 8 pixels out
    expected = 2.0 * (4 * oi + 1.5) + 3.0 * (4 * oj + 1.5) + 5.0
    np.testing.assert_allclose(out[3:-3, 3:-3], expected[3:-3, 3:-3], rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_in,n_out,scale", [(4, 2, 0.5), (1356, 339, 0.25), (10, 40, 4.0), (9, 7, 7 / 9)])
def test_kernel_weights_sum_to_one(n_in, n_out, scale):
    weights, indices = contributions(n_in, n_out, scale)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert indices.min() >= 0 and indices.max() < n_in
    np.testing.assert_allclose(weight_matrix(n_in, n_out, scale).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_border_indices_are_mirror_reflected():
    # 4 pixels, x1/2: output 1 sits at u = 1.5, taps 1-based -3..6; output 2 at u = 3.5, taps -1..8.
    # MATLAB mirrors with period 8 over [1 2 3 4 4 3 2 1] (the edge pixel repeats).
    _, indices = contributions(4, 2, 0.5)
    assert indices.tolist() == [[3, 2, 1, 0, 0, 1, 2, 3, 3, 2],
                                [1, 0, 0, 1, 2, 3, 3, 2, 1, 0]]


def test_uint8_rounds_and_clips_after_each_pass():
    away = imresize(CRAFTED, 0.5, rounding="half_away")
    even = imresize(CRAFTED, 0.5, rounding="half_even")
    assert away.tolist() == [[154, 148], [181, 98]]
    assert even.tolist() == [[153, 148], [181, 98]]  # 153.5 after the second pass
    once = np.floor(np.clip(imresize(CRAFTED.astype(np.float64), 0.5), 0, 255) + 0.5)
    assert not np.array_equal(away, once)  # rounding only at the end would be wrong here
    assert np.array_equal(away, _reference(CRAFTED, 0.5, "half_away"))
    assert np.array_equal(even, _reference(CRAFTED, 0.5, "half_even"))


@pytest.mark.parametrize("scale", [0.25, 0.5, 0.75, 3.0])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_uint8_matches_tap_by_tap_reference(scale, rounding):
    rng = np.random.default_rng(7)
    img = (rng.integers(0, 5, (23, 17, 3)) * 64).clip(0, 255).astype(np.uint8)  # plateaus make ties
    assert np.array_equal(imresize(img, scale, rounding=rounding), _reference(img, scale, rounding))


def test_smaller_scale_resized_first():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    out = imresize(img, output_size=(10, 6))  # columns (x1/4) go first
    cols_first = imresize(imresize(img, output_size=(20, 6)), output_size=(10, 6))
    rows_first = imresize(imresize(img, output_size=(10, 24)), output_size=(10, 6))
    assert np.array_equal(out, cols_first)
    assert not np.array_equal(out, rows_first)


def test_numpy_and_torch_agree_before_rounding():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)
    as_torch = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    flt_np = imresize(img.astype(np.float64), 0.25)
    flt_torch = imresize(as_torch, 0.25)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(flt_torch, flt_np, rtol=0, atol=1e-10)
    # one pass only (columns keep scale 1): the uint8 result is the rounded float result
    one_pass = imresize(as_torch, output_size=(8, 26))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(imresize(img, output_size=(8, 26)), np.floor(np.clip(one_pass, 0, 255) + 0.5))
    # two passes: the intermediate rounding moves results by at most one level
    two = np.floor(np.clip(flt_torch, 0, 255) + 0.5)
    assert np.abs(imresize(img, 0.25).astype(int) - two).max() <= 1


def test_float32_and_gray_layouts():
    rng = np.random.default_rng(4)
    img = rng.random((16, 12, 3)).astype(np.float32)
    out = imresize(img, 0.5)
    assert out.dtype == np.float32 and out.shape == (8, 6, 3)
    np.testing.assert_allclose(imresize(img[:, :, 1], 0.5), out[:, :, 1], atol=1e-6)


def test_torch_path_is_differentiable():
    x = torch.rand(1, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize(t, 0.5), (x,))
    assert torch.autograd.gradcheck(lambda t: imresize(t, output_size=(4, 11)), (x,))
    sr = torch.rand(2, 3, 192, 192)
    assert imresize(sr, 0.25).shape == (2, 3, 48, 48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_cuda_matches_cpu():
    x = torch.rand(2, 3, 64, 48)
    np.testing.assert_allclose(imresize(x.cuda(), 0.25).cpu().numpy(), imresize(x, 0.25).numpy(), atol=1e-5)


def test_mod_crop():
    img = np.arange(10 * 7 * 3).reshape(10, 7, 3)
    out = mod_crop(img, 4)
    assert out.shape == (8, 4, 3) and np.array_equal(out, img[:8, :4])
    assert mod_crop(img[:, :, 0], 1).shape == (10, 7)


@pytest.mark.parametrize("call,match", [
    (lambda: imresize(np.zeros((4, 4), np.uint8), 0.5, rounding="nearest"), "rounding"),
    (lambda: imresize(np.zeros((4, 4), np.uint8), 0.5, output_size=(2, 2)), "exactly one"),
    (lambda: imresize(np.zeros((4, 4), np.uint8)), "exactly one"),
    (lambda: imresize(np.zeros((4, 4), np.int16), 0.5), "uint8 or float"),
    (lambda: imresize(torch.zeros(3, 4, 4), 0.5), "N, C, H, W"),
    (lambda: imresize(np.zeros((4, 4)), -1.0), "scale"),
    (lambda: mod_crop(np.zeros((4, 4)), 0), "multiple"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
