"""MATLAB-exact bicubic ``imresize`` (numpy and differentiable torch), ``mod_crop``, and the exact consistency
projection onto the images whose bicubic x1/4 is a given LR image.

The x4 LR images of DIV2K, the fidelity loss ``||y - down(G(y))||_1`` and the
NTIRE 2021 LR-PSNR all assume MATLAB's ``imresize(x, 1/4, 'bicubic')``:

* Keys cubic kernel with a = -0.5, stretched by 1/scale when downscaling
  (antialiasing), weights normalised to sum to one per output sample;
* sample positions ``u = x/scale + (1 - 1/scale)/2`` (1-based), output size
  ``ceil(scale * size)`` unless given;
* out-of-range taps take the mirror-reflected pixel (symmetric padding that
  repeats the edge sample), the kernel is *not* truncated and renormalised;
* the dimension with the smaller scale is resized first;
* uint8 images are clipped to [0, 255] and rounded to uint8 after *each*
  one-dimensional pass.

Each pass is a product with a banded ``(out, in)`` matrix in which the mirror
taps are folded onto the pixels they read. The numpy path applies the band
block by block with BLAS (no per-tap gathers); the torch path uses the dense
matrix, which autograd differentiates and which suits a GPU.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np

KERNEL_WIDTH = 4.0  # support of the Keys cubic kernel, in input samples
ROUNDING_MODES = ("half_away", "half_even")
_BLOCK = 4  # outputs per BLAS call: small blocks waste few multiplications on the band's zeros
_F32_EXACT_BITS = 24  # float32 significand: integer sums below 2**24 are exact


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel (a = -0.5) at float64 offsets ``x``; zero outside [-2, 2]."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's per-output taps along one axis.

    Takes the input and output lengths and the scale (output/input) of that axis.
    Returns ``(weights, indices)``, both ``(out_len, P)``: float64 weights that
    sum to one per row, and 0-based input indices already mirror-reflected into
    ``[0, in_len)``. All P = ceil(kernel width) + 2 taps are kept, including
    the all-zero tap columns that MATLAB drops (they add nothing).
    """
    if scale < 1:  # antialiasing: the kernel is stretched to the output's sampling rate
        width = KERNEL_WIDTH / scale

        def kernel(t):
            return scale * cubic(scale * t)
    else:
        width = KERNEL_WIDTH
        kernel = cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # 1-based input coordinate of each output
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx1 = left[:, None] + np.arange(taps)  # 1-based, may leave [1, in_len]
    weights = kernel(u[:, None] - idx1)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return weights, mirror_index(idx1.astype(np.int64) - 1, in_len)


def mirror_index(index: np.ndarray, length: int) -> np.ndarray:
    """MATLAB ``imresize``'s boundary rule: 0-based indices of any integer value reflected into ``[0, length)``.

    Symmetric padding that repeats the edge sample (-1 -> 0, -2 -> 1,
    length -> length - 1), periodic with period ``2 * length``. Takes and
    returns int64 arrays of the same shape. The training data's HR context
    (:class:`srmap.data.PatchDataset`) reads past the image edge with it, so
    that it matches the boundary the LR images were made with.
    """
    mirror = np.concatenate([np.arange(length), np.arange(length - 1, -1, -1)])
    return mirror[np.mod(np.asarray(index, dtype=np.int64), 2 * length)]


@functools.lru_cache(maxsize=64)
def _taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Cached, read-only :func:`contributions` (small: ``(out_len, P)``)."""
    weights, indices = contributions(in_len, out_len, scale)
    weights.flags.writeable = False
    indices.flags.writeable = False
    return weights, indices


def _fold(weights: np.ndarray, indices: np.ndarray, first: int, width: int) -> np.ndarray:
    """Dense ``(rows, width)`` block whose column j holds the summed weight of input ``first + j``.

    Zero-weight taps are skipped (they may point outside the block).
    """
    block = np.zeros((weights.shape[0], width), dtype=np.float64)
    rows = np.broadcast_to(np.arange(weights.shape[0])[:, None], weights.shape)
    used = weights != 0
    np.add.at(block, (rows[used], indices[used] - first), weights[used])
    return block


def weight_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense float64 ``(out_len, in_len)`` resampling matrix with the mirror taps folded in.

    Row i holds the weight of every input pixel in output i; rows sum to one.
    """
    weights, indices = _taps(in_len, out_len, scale)
    return _fold(weights, indices, 0, in_len)


def _dyadic_bits(values: np.ndarray, max_bits: int = 30) -> int | None:
    """Smallest k with every entry of ``values`` a multiple of 2**-k, or None if above ``max_bits``."""
    for k in range(max_bits + 1):
        scaled = values * float(2**k)
        if np.array_equal(scaled, np.round(scaled)):
            return k
    return None


@functools.lru_cache(maxsize=64)
def _bands(in_len: int, out_len: int, scale: float, channels: int) -> tuple[tuple, bool]:
    """Blocks ``(r0, r1, c0, c1, w64, w32)`` of the band, and whether float32 is exact for uint8 data.

    Block k maps inputs ``c0:c1`` to outputs ``r0:r1``. For blocks applied along
    the second image axis (``channels`` > 0), ``w`` is ``kron(block.T, I_channels)``
    so that an ``(H, W*C)`` image is resampled without transposing it.
    """
    weights, indices = _taps(in_len, out_len, scale)
    blocks = []
    for r0 in range(0, out_len, _BLOCK):
        r1 = min(r0 + _BLOCK, out_len)
        used = indices[r0:r1][weights[r0:r1] != 0]
        c0, c1 = int(used.min()), int(used.max()) + 1
        w = _fold(weights[r0:r1], indices[r0:r1], c0, c1 - c0)
        if channels:
            w = np.kron(w.T, np.eye(channels))
        w = np.ascontiguousarray(w)
        blocks.append((r0, r1, c0, c1, w, w.astype(np.float32)))
    # With weights on a 2**-k grid and integer pixels in [0, 255], every product and
    # partial sum is a multiple of 2**-k below sum|w| * 255, so float32 BLAS gives the
    # exact float64 result (the x1/4 and x1/2 kernels are on a 2**-12 / 2**-8 grid).
    # Folding mirror taps only adds weights on the same grid, with no larger sum |w|.
    bits = _dyadic_bits(weights)
    exact32 = bits is not None and np.abs(weights).sum(axis=1).max() * 255 * 2.0**bits < 2.0**_F32_EXACT_BITS
    return tuple(blocks), bool(exact32)


def _round_uint8_(a: np.ndarray, rounding: str) -> np.ndarray:
    """Clip float array ``a`` to [0, 255] and round it in place (values stay float)."""
    np.clip(a, 0, 255, out=a)
    if rounding == "half_even":
        return np.rint(a, out=a)
    if a.dtype == np.float32:  # float32 only holds exact values on a 2**-k grid, so a + 0.5 is exact
        np.add(a, 0.5, out=a)
        return np.floor(a, out=a)
    floor = np.floor(a)
    # a - floor(a) is exact, unlike floor(a + 0.5), which rounds 0.49999999999999994 up
    return np.add(floor, (a - floor) >= 0.5, out=a)


def _fix_near_ties_(out: np.ndarray, src: np.ndarray, axis: int, channels: int, scale: float) -> None:
    """Recompute, in MATLAB's tap order, the outputs of a float64 pass that lie near a rounding tie.

    BLAS sums the taps in its own order, so a value whose exact result is k + 0.5
    can come out a few ulps to either side and round differently than in MATLAB
    or the numpy port, which add ``w[p] * x[p]`` one tap after the other. Only
    values within ``1e-7`` of a tie can be affected; they are few, so they are
    redone here with that sequential sum. ``out`` and ``src`` are 2-D (rows, W*C).
    """
    frac = out - np.floor(out)
    rows, cols = np.nonzero(np.abs(frac - 0.5) < 1e-7)
    if rows.size == 0:
        return
    if axis == 0:
        weights, indices = _taps(src.shape[0], out.shape[0], scale)
        taps_w, taps_i = weights[rows], indices[rows]
        gather = lambda p: src[taps_i[:, p], cols]  # noqa: E731
    else:
        weights, indices = _taps(src.shape[1] // channels, out.shape[1] // channels, scale)
        j, c = np.divmod(cols, channels)
        taps_w, taps_i = weights[j], indices[j]
        gather = lambda p: src[rows, taps_i[:, p] * channels + c]  # noqa: E731
    acc = taps_w[:, 0] * gather(0).astype(np.float64)
    for p in range(1, taps_w.shape[1]):
        acc = acc + taps_w[:, p] * gather(p).astype(np.float64)
    out[rows, cols] = acc


def _pass_numpy(a: np.ndarray, axis: int, out_len: int, scale: float, work: np.dtype,
                fix_ties: bool) -> np.ndarray:
    """Resample ``(H, W, C)`` array ``a`` along ``axis`` (0 or 1); returns a ``work``-dtype array."""
    h, w, c = a.shape
    src = a.reshape(h, w * c)
    if axis == 0:
        blocks, _ = _bands(h, out_len, scale, 0)
        out = np.empty((out_len, w * c), dtype=work)
        for r0, r1, c0, c1, w64, w32 in blocks:
            wb = w32 if work == np.float32 else w64
            np.matmul(wb, src[c0:c1].astype(work, copy=False), out=out[r0:r1])
    else:
        blocks, _ = _bands(w, out_len, scale, c)
        out = np.empty((h, out_len * c), dtype=work)
        for r0, r1, c0, c1, w64, w32 in blocks:
            wb = w32 if work == np.float32 else w64
            np.matmul(src[:, c0 * c:c1 * c].astype(work, copy=False), wb, out=out[:, r0 * c:r1 * c])
    if fix_ties:
        _fix_near_ties_(out, src, axis, c, scale)
    return out.reshape((out_len, w, c) if axis == 0 else (h, out_len, c))


def _resize_numpy(img: np.ndarray, sizes: tuple[int, int], scales: tuple[float, float],
                  order: list[int], rounding: str) -> np.ndarray:
    """numpy implementation of :func:`imresize` for an HxW or HxWxC uint8/float array."""
    squeeze = img.ndim == 2
    a = img[:, :, None] if squeeze else img
    is_uint8 = img.dtype == np.uint8
    exact32 = is_uint8 and all(_bands(img.shape[d], sizes[d], scales[d], 0 if d == 0 else a.shape[2])[1]
                               for d in order)
    work = np.dtype(np.float32) if exact32 else np.dtype(np.float64)
    for dim in order:
        a = _pass_numpy(a, dim, sizes[dim], scales[dim], work, fix_ties=is_uint8 and not exact32)
        if is_uint8:
            _round_uint8_(a, rounding)
    a = a.astype(img.dtype)
    return a[:, :, 0] if squeeze else a


@functools.lru_cache(maxsize=16)  # dense: a 2040-wide x1/4 matrix is 4 MB in float32
def _torch_matrix(in_len: int, out_len: int, scale: float, device: Any, dtype: Any):
    """:func:`weight_matrix` as a torch tensor on ``device`` with ``dtype`` (cached, do not modify)."""
    import torch

    return torch.from_numpy(weight_matrix(in_len, out_len, scale)).to(device=device, dtype=dtype)


def _resize_torch(x, sizes: tuple[int, int], scales: tuple[float, float], order: list[int]):
    """torch implementation of :func:`imresize` for a float (N, C, H, W) tensor; differentiable."""
    import torch  # already loaded: the caller passed a tensor

    for dim in order:
        n_in = x.shape[2 + dim]
        mat = _torch_matrix(n_in, sizes[dim], scales[dim], x.device, x.dtype)
        if dim == 0:
            x = torch.matmul(mat, x)  # (h', H) @ (N, C, H, W) -> (N, C, h', W)
        else:
            x = torch.matmul(x, mat.transpose(0, 1))  # (N, C, H, W) @ (W, w') -> (N, C, H, w')
    return x


def _is_torch_tensor(obj: Any) -> bool:
    """True if ``obj`` is a torch.Tensor, without importing torch when it is not loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def imresize(img, scale: float | None = None, output_size: tuple[int, int] | None = None, *,
             rounding: str = "half_away"):
    """MATLAB ``imresize(img, scale, 'bicubic')`` (or to ``output_size = (rows, cols)``).

    Takes a numpy uint8 or float array, HxW or HxWxC (any range; uint8 is
    clipped and rounded after each pass as MATLAB does), or a torch float
    tensor (N, C, H, W) on any device (no clipping or rounding; differentiable,
    e.g. ``imresize(sr, 0.25)`` with ``sr`` in [0, 1] for the fidelity loss).
    Returns the same type, dtype and layout with the new height and width.

    ``rounding``: 'half_away' rounds ties away from zero like MATLAB;
    'half_even' rounds them to even like ``np.around`` in the numpy port
    (github.com/fatheral/matlab_imresize) that the NTIRE 2021 "Learning the SR
    space" evaluation imports. It only matters for uint8 input.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"imresize: rounding={rounding!r}; expected one of {ROUNDING_MODES}")
    if (scale is None) == (output_size is None):
        raise ValueError("imresize: give exactly one of scale and output_size")
    is_torch = _is_torch_tensor(img)
    if is_torch:
        if img.ndim != 4 or not img.is_floating_point():
            raise ValueError(f"imresize: torch input must be a float (N, C, H, W) tensor, got "
                             f"{img.dtype} with shape {tuple(img.shape)}")
        in_hw = (int(img.shape[2]), int(img.shape[3]))
    else:
        if not isinstance(img, np.ndarray):
            raise TypeError(f"imresize: expected a numpy array or torch tensor, got {type(img).__name__}")
        if img.ndim not in (2, 3) or not (img.dtype == np.uint8 or np.issubdtype(img.dtype, np.floating)):
            raise ValueError(f"imresize: numpy input must be uint8 or float, HxW or HxWxC; got {img.dtype} "
                             f"with shape {img.shape}")
        in_hw = (int(img.shape[0]), int(img.shape[1]))
    if min(in_hw) < 1:
        raise ValueError(f"imresize: empty image of size {in_hw}")
    if scale is not None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"imresize: scale={scale}; expected a positive finite number")
        scales = (scale, scale)
        sizes = (int(math.ceil(scale * in_hw[0])), int(math.ceil(scale * in_hw[1])))
    else:
        if len(output_size) != 2 or any(int(s) != s or s < 1 for s in output_size):
            raise ValueError(f"imresize: output_size={output_size}; expected two positive integers (rows, cols)")
        sizes = (int(output_size[0]), int(output_size[1]))
        scales = (sizes[0] / in_hw[0], sizes[1] / in_hw[1])
    order = [int(d) for d in np.argsort(scales, kind="stable")]  # smaller scale first, rows on ties
    if is_torch:
        return _resize_torch(img, sizes, scales, order)
    return _resize_numpy(img, sizes, scales, order, rounding)


def mod_crop(img, multiple: int):
    """Crop an HxW or HxWxC array (top-left anchored) so both sides are multiples of ``multiple``."""
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"mod_crop: multiple={multiple}; expected a positive integer")
    h, w = img.shape[:2]
    return img[: h - h % multiple, : w - w % multiple]


# ---------------------------------------------------------------------------
# Consistency projection
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _projector(in_len: int, out_len: int, scale: float, border: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, L)`` along one axis, float64: ``A`` = rows ``border:out_len-border`` of :func:`weight_matrix`
    (m, in_len) and ``L = A^T (A A^T)^-1`` (in_len, m), its right inverse (A L = I)."""
    A = weight_matrix(in_len, out_len, scale)[border:out_len - border]
    L = np.linalg.solve(A @ A.T, A).T  # A A^T is symmetric positive definite (banded, 7 diagonals for x1/4)
    return np.ascontiguousarray(A), np.ascontiguousarray(L)


@functools.lru_cache(maxsize=32)
def _torch_projector(in_len: int, out_len: int, scale: float, border: int, device: Any, dtype: Any):
    import torch

    return tuple(torch.from_numpy(m).to(device=device, dtype=dtype) for m in _projector(in_len, out_len, scale,
                                                                                         border))


def project_consistent(x, lr, *, scale: int = 4, border: int = 0):
    """Orthogonal projection of ``x`` onto the images whose MATLAB bicubic x1/``scale`` equals ``lr``.

    ``x``: float (N, C, H, W) torch tensor in [0, 1] (float32 or float64, any
    device, any H and W); ``lr``: (N, C, ceil(H/scale), ceil(W/scale)), same
    dtype and device. With D = A_h (x) A_w the resize of :func:`imresize` (the
    fidelity loss's and LR-PSNR's D, per channel),

        P(x) = x - A_h^T (A_h A_h^T)^-1 (A_h X A_w^T - Y) (A_w A_w^T)^-1 A_w,

    so D P(x) = y, P(P(x)) = P(x), x - P(x) lies in D's row space and P(x) = x
    when x is already consistent. This is the consistency-enforcing module of
    Bahat & Michaeli ("Explorable Super Resolution", CVPR 2020), which inverts
    approximately in the Fourier domain; here the inverse is exact (A A^T is
    banded and well conditioned). ``border`` > 0 constrains only the LR rows
    and columns ``border:-border`` (training patches, whose outer LR pixels
    saw context outside the HR patch). Differentiable; the result is not
    clamped (see :func:`project_consistent_box`). Raises ValueError for
    mismatched shapes.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"project_consistent: x must be a float (N, C, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    h, w = (int(math.ceil(n / scale)) for n in x.shape[-2:])
    if tuple(lr.shape) != (*x.shape[:2], h, w):
        raise ValueError(f"project_consistent: lr has shape {tuple(lr.shape)}; expected {(*x.shape[:2], h, w)} "
                         f"(x {tuple(x.shape)} downscaled x1/{scale})")
    b = int(border)
    if b < 0 or 2 * b >= min(h, w):
        raise ValueError(f"project_consistent: border {border} leaves nothing of a {h}x{w} LR image")
    A_h, L_h = _torch_projector(int(x.shape[-2]), h, 1.0 / scale, b, x.device, x.dtype)
    A_w, L_w = _torch_projector(int(x.shape[-1]), w, 1.0 / scale, b, x.device, x.dtype)
    y = lr.to(x.dtype)[..., b:h - b, b:w - b]
    residual = A_h @ x @ A_w.T - y  # (N, C, m_h, m_w)
    return x - L_h @ residual @ L_w.T  # (N, C, H, W)


def project_consistent_box(x, lr, *, scale: int = 4, iterations: int = 10):
    """Alternating projections between the consistent images (:func:`project_consistent`) and the [0, 1] box.

    ``iterations`` rounds of ``x <- clamp(P(x), 0, 1)`` (von Neumann / POCS; both
    sets are convex and, for an LR made from a [0, 1] image, intersect), so the
    result is a valid image that, after uint8 rounding, stays consistent to
    tens of dB more than a single projection followed by clamping. Same
    arguments as :func:`project_consistent` (``border`` 0); returns float in [0, 1].
    """
    if int(iterations) < 1:
        raise ValueError(f"project_consistent_box: iterations must be >= 1, got {iterations}")
    for _ in range(int(iterations)):
        x = project_consistent(x, lr, scale=scale).clamp(0, 1)
    return x
