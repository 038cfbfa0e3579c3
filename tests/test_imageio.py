"""srmap.imageio: one reader for every stage and command (EXIF, alpha, 16-bit, bad files), the PNG
writer (8/16-bit, atomic), and the umask of every atomic write. All inputs are made here."""

import os
import stat
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import ROOT
from srmap.imageio import ImageConversionWarning, read_image, read_rgb8, write_png
from srmap.utils import atomic_dir, atomic_write_text

MAXPIX = 10_000_000


def png_bytes(arr: np.ndarray, bit_depth: int, color_type: int, size: tuple[int, int] | None = None) -> bytes:
    """A minimal PNG (filter 0 rows), written byte by byte here; ``size`` overrides the header's (w, h)."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[r].astype(dtype).tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = size or (w, h)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_importing_imageio_does_not_import_torch():
    code = "import sys, srmap.imageio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def test_plain_gray_and_palette_read_without_a_note(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "pal.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost: no note
        assert np.array_equal(read_rgb8(tmp_path / "a.png"), rgb)
        assert np.array_equal(read_rgb8(tmp_path / "gray.png"), np.repeat(rgb[:, :, :1], 3, axis=2))
        pal = read_rgb8(tmp_path / "pal.png")
    assert np.array_equal(pal, np.asarray(Image.open(tmp_path / "pal.png").convert("RGB")))
    img = read_image(tmp_path / "a.png")
    assert img.alpha is None and img.bits == 8 and img.rgb.dtype == np.uint8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    if orientation in (5, 6, 7, 8):
        assert expected.shape == (9, 6, 3)  # the reference really rotates
    assert np.array_equal(read_image(tmp_path / "o.png").rgb, expected)


def test_exif_rotated_jpeg_portrait_comes_out_upright(tmp_path):
    # a 48x64 (WxH) portrait stored as a 64x48 landscape JPEG with "rotate 90 CW" in its EXIF
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the stored left edge ends up on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "p.jpg", exif=exif.tobytes(), quality=95)
    img = read_image(tmp_path / "p.jpg")
    assert img.rgb.shape == (64, 48, 3)
    assert img.rgb[:4].mean() > 200 and img.rgb[-20:].mean() < 30
    assert "EXIF orientation 6 applied" in img.notes


def test_rgba_and_transparent_palette_keep_alpha(tmp_path, rgb):
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 5:] = 255
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert np.array_equal(img.rgb, rgb) and np.array_equal(img.alpha, alpha)
    # palette PNG whose index 0 (pure green) is transparent
    idx = np.ones((4, 6), np.uint8)
    idx[:, :2] = 0
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 255, 0, 200, 10, 10] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    img = read_image(tmp_path / "pal.png")
    assert img.alpha is not None and (img.alpha[:, :2] == 0).all() and (img.alpha[:, 2:] == 255).all()
    with pytest.warns(ImageConversionWarning, match=r"pal\.png: alpha channel dropped \(8 non-opaque"):
        read_rgb8(tmp_path / "pal.png")
    with pytest.warns(ImageConversionWarning, match=r"rgba\.png: alpha channel dropped"):
        assert np.array_equal(read_rgb8(tmp_path / "rgba.png"), rgb)


def test_16bit_is_read_at_full_precision(tmp_path):
    rgb16 = np.array([[[0, 257, 65535], [32896, 255, 65280]], [[1, 2, 3], [40000, 50001, 60002]]], np.uint16)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(rgb16, 16, 2))
    (tmp_path / "gray16.png").write_bytes(png_bytes(rgb16[:, :, 1], 16, 0))
    rgba16 = np.dstack([rgb16, np.array([[0, 65535], [1000, 65535]], np.uint16)])
    (tmp_path / "rgba16.png").write_bytes(png_bytes(rgba16, 16, 6))
    img = read_image(tmp_path / "rgb16.png")
    assert img.bits == 16 and np.array_equal(img.rgb, rgb16) and img.alpha is None
    gray = read_image(tmp_path / "gray16.png")
    assert gray.bits == 16 and np.array_equal(gray.rgb[:, :, 0], rgb16[:, :, 1])
    rgba = read_image(tmp_path / "rgba16.png")
    assert np.array_equal(rgba.rgb, rgb16) and np.array_equal(rgba.alpha, rgba16[:, :, 3])
    # the pipeline/evaluate view keeps the high byte, as OpenCV's imread(IMREAD_COLOR) does
    with pytest.warns(ImageConversionWarning, match=r"rgb16\.png: 16-bit reduced"):
        assert np.array_equal(read_rgb8(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))
    with pytest.warns(ImageConversionWarning, match="16-bit"):
        assert read_rgb8(tmp_path / "gray16.png")[:, :, 0].tolist() == [[1, 0], [0, 195]]


def test_write_png_8_and_16_bit_roundtrip(tmp_path, rgb):
    write_png(tmp_path / "sub" / "x.png", rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "x.png")), rgb)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temp file left
    deep = np.random.default_rng(1).integers(0, 65536, (7, 5, 4), dtype=np.uint16)
    for c in (1, 3, 4):
        arr = deep[:, :, :c] if c > 1 else deep[:, :, 0]
        write_png(tmp_path / f"d{c}.png", arr)
        back = read_image(tmp_path / f"d{c}.png")
        assert back.bits == 16 and np.array_equal(back.rgb[:, :, :min(c, 3)], deep[:, :, :min(c, 3)])
    assert np.array_equal(read_image(tmp_path / "d4.png").alpha, deep[:, :, 3])
    # an independent decoder (Pillow, which keeps the high byte) reads our 16-bit encoding too
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d3.png")), (deep[:, :, :3] >> 8).astype(np.uint8))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        write_png(tmp_path / "y.png", rgb.astype(np.float32))


def test_truncated_and_garbage_files_name_the_file(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image" * 10)
    deep = png_bytes(np.zeros((4, 4, 3), np.uint16), 16, 2)
    (tmp_path / "cut16.png").write_bytes(deep[:-30])
    for name in ("cut.png", "junk.png", "cut16.png"):
        with pytest.raises(ValueError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, rgb):
    # header claims 50000 x 50000 pixels; the data would not even decode
    (tmp_path / "bomb.png").write_bytes(png_bytes(rgb[:2, :2, :], 8, 2, size=(50_000, 50_000)))
    with pytest.raises(ValueError, match=r"bomb.png.*max_pixels"):
        read_image(tmp_path / "bomb.png", max_pixels=MAXPIX)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="max_pixels=100"):
        read_rgb8(tmp_path / "ok.png", max_pixels=100)


@pytest.mark.parametrize("mask", [0o002, 0o022])
def test_atomic_writes_honour_the_umask(tmp_path, rgb, mask):
    old = os.umask(mask)
    try:
        write_png(tmp_path / "a.png", rgb)
        atomic_write_text(tmp_path / "b.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("y")
    finally:
        os.umask(old)
    for name in ("a.png", "b.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask


def test_degrade_stage_says_once_per_file_what_it_dropped(tmp_path, rgb):
    from srmap.prepare import degrade_split

    (tmp_path / "hr").mkdir()
    big = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([big, np.full((32, 32), 9, np.uint8)])).save(tmp_path / "hr" / "a.png")
    Image.fromarray(big).save(tmp_path / "hr" / "b.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        degrade_split(tmp_path / "hr", tmp_path / "out", max_pixels=MAXPIX, progress=False)
    notes = [str(w.message) for w in caught if issubclass(w.category, ImageConversionWarning)]
    assert len(notes) == 1 and "a.png: alpha channel dropped (1024 non-opaque" in notes[0]
