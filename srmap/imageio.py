"""Image files in and out, for every stage and command: one reader, one PNG writer (numpy + Pillow).

:func:`read_image` decodes a file at full precision: RGB as uint8 or uint16,
the alpha channel kept apart, the EXIF orientation applied (as OpenCV's
``imread`` does), gray and palette expanded. :func:`read_rgb8` is the view the
pipeline and ``srmap evaluate`` use: uint8 RGB, 16-bit reduced to its high
byte and alpha dropped, as OpenCV's ``imread(IMREAD_COLOR)`` does in BasicSR
and the NTIRE 2021 scorer, with one :class:`ImageConversionWarning` per file
saying what was dropped. :func:`write_png` writes uint8 or uint16 gray, RGB
or RGBA atomically with the user's umask.

Pillow cannot decode or encode 16-bit colour (it reduces 16-bit RGB(A) PNGs to
8 bits on read). Those PNGs are read and written with pypng (pure Python,
lossless at any bit depth), imported only for such files; importing this module
never imports torch.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from srmap.utils import atomic_path

# The one decompression-bomb limit (Pillow's own warning threshold, about 89.5 Mpx); params.yaml's
# data.max_pixels overrides it for the pipeline's downloads and degrade stage.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_ORIENTATION_TAG = 0x0112


class ImageConversionWarning(UserWarning):
    """An image was converted on read in a way that loses information (alpha or 16-bit dropped, ...)."""


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image file."""

    rgb: np.ndarray  # HxWx3, uint8 (0..255) or uint16 (0..65535), C-contiguous
    alpha: np.ndarray | None  # HxW, same dtype as rgb (opaque = the dtype's max), None when the file has none
    notes: tuple[str, ...]  # conversions made on read, e.g. 'EXIF orientation 6 applied', 'palette expanded'

    @property
    def bits(self) -> int:
        """Bits per channel: 8 or 16."""
        return 16 if self.rgb.dtype == np.uint16 else 8


def array_to_rgb(arr: np.ndarray, name: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a decoded HxW / HxWxC array (C = 1..4; bool, uint8, uint16 or float in [0, 1]) into (rgb, alpha).

    rgb is HxWx3 uint8 or uint16 (float becomes uint8, bool 0/255); alpha is
    HxW of the same dtype or None. Appends a note for every conversion.
    Raises ValueError naming ``name`` for any other dtype or shape.
    """
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
        notes.append("1-bit to 0/255")
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        arr = arr.astype(np.uint16)  # native byte order
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 2:  # Pillow's 32-bit "I" mode for 16-bit gray
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{name}: 32-bit integer image with values outside [0, 65535]")
        arr = arr.astype(np.uint16)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise ValueError(f"{name}: float image outside [0, 1] (or not finite); expected uint8/uint16 or "
                             f"float in [0, 1]")
        arr = np.round(arr * 255).astype(np.uint8)
        notes.append("float to 8-bit")
    elif arr.dtype != np.uint8:
        raise ValueError(f"{name}: unsupported pixel type {arr.dtype}; expected 8- or 16-bit")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{name}: image of shape {arr.shape}; expected HxW or HxWxC with C in 1..4")
    alpha = None
    if arr.shape[2] in (2, 4):
        arr, alpha = arr[:, :, :-1], np.ascontiguousarray(arr[:, :, -1])
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
        notes.append("gray to RGB")
    return np.ascontiguousarray(arr), alpha


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an HxW(xC) array (same mapping as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, k=-1)  # 90 degrees clockwise
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(arr, k=1)  # 90 degrees counter-clockwise
    return arr


def _deep_colour_png(im: Image.Image) -> bool:
    """True for a PNG whose colour channels are 16-bit (Pillow would reduce them to 8 bits)."""
    raw = [str(getattr(t, "args", "")) for t in (im.tile or [])]
    return im.format == "PNG" and any(r in ("RGB;16B", "RGBA;16B", "LA;16B") for r in raw)


def _decode_png16(path: Path) -> np.ndarray:
    """Decode a 16-bit colour PNG losslessly with pypng: uint16 HxWxC (C = 2, 3 or 4).

    Raises ValueError naming ``path`` for a truncated or corrupt file.
    """
    import png

    try:
        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        arr = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    except (png.Error, OSError, ValueError) as exc:
        raise ValueError(f"{path}: truncated or corrupt 16-bit PNG ({str(exc).splitlines()[0]})") from exc
    return arr.reshape(height, width, info["planes"])


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an image file (PNG, JPEG, BMP, TIFF, WebP, anything Pillow reads) at full precision.

    Returns a :class:`DecodedImage`: RGB uint8 or uint16, alpha kept apart
    (a palette's transparent index becomes alpha), EXIF orientation applied.
    Raises FileNotFoundError for a missing file and ValueError naming the file
    for an undecodable, truncated or unsupported one, or one with more than
    ``max_pixels`` pixels (decompression-bomb guard, checked from the header).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")

    def bomb(size: str) -> str:
        return f"{path}: {size} is more than max_pixels={max_pixels} (decompression-bomb guard)"

    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(bomb("a size beyond Pillow's own hard limit")) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from e
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(bomb(f"{w}x{h} = {w * h} pixels"))
            deep = _deep_colour_png(im)  # before getexif(), which may decode a PNG (and drop its raw mode)
            try:
                orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
            except (OSError, SyntaxError, ValueError, TypeError, struct.error, zlib.error):
                orientation = 1  # unreadable EXIF: keep the stored orientation
            if deep:
                arr = _decode_png16(path)
                mode = "16-bit PNG"
            else:
                try:
                    im.load()
                except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
                    raise ValueError(f"{path}: truncated or corrupt image ({e})") from e
                mode = im.mode
                if mode in ("P", "PA"):
                    has_alpha = mode == "PA" or "transparency" in im.info
                    arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
                    notes.append("palette expanded")
                elif mode in ("1", "L", "LA", "RGB", "RGBA", "I") or mode.startswith("I;16"):
                    arr = np.asarray(im)
                elif mode in ("La", "RGBa"):  # premultiplied alpha
                    arr = np.asarray(im.convert("RGBA"))
                elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
                    arr = np.asarray(im.convert("RGB"))
                    notes.append(f"{mode} to RGB")
                else:
                    raise ValueError(f"{path}: unsupported image mode {mode!r}; expected gray, RGB(A), palette, "
                                     f"8 or 16 bits per channel")
    rgb, alpha = array_to_rgb(arr, str(path), notes)
    if orientation in range(2, 9):
        rgb = np.ascontiguousarray(_orient(rgb, orientation))
        alpha = None if alpha is None else np.ascontiguousarray(_orient(alpha, orientation))
        notes.append(f"EXIF orientation {orientation} applied")
    return DecodedImage(rgb, alpha, tuple(notes))


def read_rgb8(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as uint8 HxWx3 RGB, as the pipeline and ``srmap evaluate`` score it.

    Like OpenCV's ``imread(IMREAD_COLOR)`` (BasicSR, the NTIRE 2021 scorer):
    16-bit channels keep their high byte and alpha is dropped (transparent
    pixels keep their stored colour). What was dropped is said once per file
    in an :class:`ImageConversionWarning`. Raises as :func:`read_image`.
    """
    img = read_image(path, max_pixels=max_pixels)
    dropped = []
    rgb = img.rgb
    if img.bits == 16:
        rgb = (rgb >> 8).astype(np.uint8)
        dropped.append("16-bit reduced to 8-bit (high byte)")
    if img.alpha is not None:
        opaque = np.iinfo(img.alpha.dtype).max
        n = int(np.count_nonzero(img.alpha != opaque))
        if n:
            dropped.append(f"alpha channel dropped ({n} non-opaque pixels keep their stored colour)")
    if dropped:
        warnings.warn(f"{path}: {'; '.join(dropped)}", ImageConversionWarning, stacklevel=2)
    return rgb


def _encode_png16(path: str | Path, img: np.ndarray) -> None:
    """Write a uint16 HxWxC array (C = 1..4: gray, gray+alpha, RGB, RGBA) to ``path`` as a 16-bit PNG (pypng)."""
    import png

    h, w, c = img.shape
    writer = png.Writer(width=w, height=h, bitdepth=16, greyscale=c <= 2, alpha=c in (2, 4))
    with open(path, "wb") as f:
        writer.write(f, np.ascontiguousarray(img).reshape(h, w * c))


def save_png(path: str | Path, img: np.ndarray) -> None:
    """Encode ``img`` as PNG into ``path`` directly (no temporary file); see :func:`write_png`."""
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16) or not (img.ndim == 2 or (img.ndim == 3 and 1 <= img.shape[2] <= 4)):
        raise ValueError(f"write_png({path}): expected uint8 or uint16 HxW or HxWxC (C = 1..4), got "
                         f"{img.dtype} {img.shape}")
    if img.dtype == np.uint16:
        _encode_png16(path, img if img.ndim == 3 else img[:, :, None])
        return
    if img.ndim == 3 and img.shape[2] in (1, 2):
        img = img[:, :, 0] if img.shape[2] == 1 else img
    Image.fromarray(np.ascontiguousarray(img)).save(path, format="PNG")


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 or uint16 HxW / HxWx1..4 array (gray, gray+alpha, RGB, RGBA) to ``path`` as PNG.

    Atomic (temporary file, then rename) and readable as the umask allows.
    uint16 is written as a 16-bit PNG. Raises ValueError for another dtype or shape.
    """
    with atomic_path(path) as tmp:
        save_png(tmp, img)
