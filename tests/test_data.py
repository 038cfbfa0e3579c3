"""Image reading/conversion, the degrade stage's library code, and PatchDataset."""

import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srmap.data import (MANIFEST, ImageConversionWarning, PatchDataset, degrade_split, fetch_skimage, read_image,
                        write_png)
from srmap.degrade import imresize

MAXPIX = 10_000_000


def _png_bytes(arr: np.ndarray, bit_depth: int, color_type: int, size: tuple[int, int] | None = None) -> bytes:
    """A minimal PNG (filter 0 rows) from a uint8/uint16 array; ``size`` overrides the header's (w, h)."""
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


def test_rgb_png_reads_without_note(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(tmp_path / "a.png", max_pixels=MAXPIX)
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)


def test_gray_rgba_palette_are_converted_with_a_note(tmp_path, rgb):
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "pal.png")
    with pytest.warns(ImageConversionWarning, match="gray.png.*gray to RGB"):
        gray = read_image(tmp_path / "gray.png", max_pixels=MAXPIX)
    assert np.array_equal(gray, np.repeat(rgb[:, :, :1], 3, axis=2))
    with pytest.warns(ImageConversionWarning, match="rgba.png.*alpha"):
        assert np.array_equal(read_image(tmp_path / "rgba.png", max_pixels=MAXPIX), rgb)
    with pytest.warns(ImageConversionWarning, match="pal.png.*palette"):
        pal = read_image(tmp_path / "pal.png", max_pixels=MAXPIX)
    expected = np.asarray(Image.open(tmp_path / "pal.png").convert("RGB"))
    assert pal.shape == rgb.shape and np.array_equal(pal, expected)


def test_16bit_pngs_keep_the_high_byte(tmp_path):
    rgb16 = np.array([[[0, 257, 65535], [32896, 255, 65280]]], np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(rgb16, 16, 2))
    (tmp_path / "gray16.png").write_bytes(_png_bytes(rgb16[:, :, 1], 16, 0))
    with pytest.warns(ImageConversionWarning, match="16-bit"):
        out = read_image(tmp_path / "rgb16.png", max_pixels=MAXPIX)
    assert out.tolist() == [[[0, 1, 255], [128, 0, 255]]]
    with pytest.warns(ImageConversionWarning, match="16-bit"):
        gray = read_image(tmp_path / "gray16.png", max_pixels=MAXPIX)
    assert gray[:, :, 0].tolist() == [[1, 0]] and gray.shape == (1, 2, 3)


def test_truncated_and_garbage_files_name_the_file(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image" * 10)
    for name in ("cut.png", "junk.png"):
        with pytest.raises(ValueError, match=name):
            read_image(tmp_path / name, max_pixels=MAXPIX)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png", max_pixels=MAXPIX)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, rgb):
    # header claims 50000 x 50000 pixels; the data would not even decode
    (tmp_path / "bomb.png").write_bytes(_png_bytes(rgb[:2, :2, :], 8, 2, size=(50_000, 50_000)))
    with pytest.raises(ValueError, match=r"bomb.png.*max_pixels"):
        read_image(tmp_path / "bomb.png", max_pixels=MAXPIX)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="max_pixels=100"):
        read_image(tmp_path / "ok.png", max_pixels=100)


def test_write_png_roundtrip_and_bad_input(tmp_path, rgb):
    write_png(tmp_path / "sub" / "x.png", rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "x.png")), rgb)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temp file left
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "y.png", rgb.astype(np.float32))


def test_fetch_skimage_offline(tmp_path):
    paths = fetch_skimage(["chelsea", "motorcycle_left"], tmp_path, multiple=8)
    assert [p.name for p in paths] == ["chelsea.png", "motorcycle_left.png"]
    for p in paths:
        img = read_image(p, max_pixels=MAXPIX)
        assert img.shape[0] % 8 == 0 and img.shape[1] % 8 == 0 and img.shape[2] == 3
    with pytest.raises(ValueError, match="unknown image name.*'lena'.*available offline: astronaut"):
        fetch_skimage(["astronaut", "lena"], tmp_path)


def _hr_folder(tmp_path: Path, shapes) -> Path:
    hr_dir = tmp_path / "hr_in"
    rng = np.random.default_rng(5)
    for k, (h, w) in enumerate(shapes):
        write_png(hr_dir / f"{k + 1:04d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return hr_dir


@pytest.mark.parametrize("fmt,workers", [("npy", 1), ("png", 2)])
def test_degrade_split(tmp_path, fmt, workers):
    hr_dir = _hr_folder(tmp_path, [(50, 66), (41, 37), (64, 64)])
    stems = degrade_split(hr_dir, tmp_path / "out", scale=4, fmt=fmt, workers=workers, max_pixels=MAXPIX,
                          progress=False)
    assert stems == ["0001", "0002", "0003"]
    for stem in stems:
        src = read_image(hr_dir / f"{stem}.png", max_pixels=MAXPIX)
        if fmt == "npy":
            hr = np.load(tmp_path / "out" / "hr" / f"{stem}.npy", mmap_mode="r")
            lr = np.load(tmp_path / "out" / "lr" / f"{stem}.npy")
        else:
            hr = read_image(tmp_path / "out" / "hr" / f"{stem}.png", max_pixels=MAXPIX)
            lr = read_image(tmp_path / "out" / "lr" / f"{stem}.png", max_pixels=MAXPIX)
        h, w = src.shape[0] // 4 * 4, src.shape[1] // 4 * 4
        assert np.array_equal(hr, src[:h, :w])
        assert np.array_equal(lr, imresize(src[:h, :w], 0.25, rounding="half_away"))
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["images"][1] == {"stem": "0002", "hr_shape": [40, 36, 3], "lr_shape": [10, 9, 3]}


def test_degrade_split_rejects_small_and_broken_images(tmp_path):
    hr_dir = _hr_folder(tmp_path, [(200, 200), (99, 300)])
    with pytest.raises(ValueError, match=r"0002.png: 96x300 .* smaller than one training patch"):
        degrade_split(hr_dir, tmp_path / "out", max_pixels=MAXPIX, min_hr_size=192, progress=False)
    (hr_dir / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="0003.png"):
        degrade_split(hr_dir, tmp_path / "out2", max_pixels=MAXPIX, progress=False)
    with pytest.raises(FileNotFoundError, match=r"no \*\.png images"):
        degrade_split(tmp_path / "out", tmp_path / "out3", max_pixels=MAXPIX, progress=False)


def _block_pairs(root: Path, shapes, scale=4) -> None:
    """hr = each LR pixel repeated scale x scale, so any aligned crop satisfies hr == kron(lr)."""
    rng = np.random.default_rng(9)
    for k, (h, w) in enumerate(shapes):
        lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / "lr").mkdir(parents=True, exist_ok=True)
        (root / "hr").mkdir(parents=True, exist_ok=True)
        np.save(root / "lr" / f"{k:04d}.npy", lr)
        np.save(root / "hr" / f"{k:04d}.npy", lr.repeat(scale, axis=0).repeat(scale, axis=1))


def test_patches_are_aligned_uint8_pairs(tmp_path):
    _block_pairs(tmp_path, [(20, 30), (16, 16), (25, 18)])
    ds = PatchDataset(tmp_path, lr_patch=8, scale=4, length=96, seed=3)
    for i in range(len(ds)):
        lr, hr = ds[i]
        assert lr.dtype == hr.dtype == torch.uint8 and lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32)
        assert torch.equal(hr, lr.repeat_interleave(4, 1).repeat_interleave(4, 2))
    # each block of n_images consecutive indices visits every image once
    assert sorted(ds.image_index(i) for i in range(3, 6)) == [0, 1, 2]


def test_patches_use_all_eight_orientations(tmp_path):
    _block_pairs(tmp_path, [(8, 8)])  # one LR image exactly one patch large: only the transform varies
    lr_img = np.load(tmp_path / "lr" / "0000.npy").transpose(2, 0, 1)
    variants = {np.ascontiguousarray(v).tobytes() for v in [
        lr_img, lr_img[:, :, ::-1], lr_img[:, ::-1], lr_img[:, ::-1, ::-1],
        lr_img.transpose(0, 2, 1), lr_img[:, :, ::-1].transpose(0, 2, 1),
        lr_img[:, ::-1].transpose(0, 2, 1), lr_img[:, ::-1, ::-1].transpose(0, 2, 1)]}
    assert len(variants) == 8
    ds = PatchDataset(tmp_path, lr_patch=8, scale=4, length=200, seed=0)
    seen = {ds[i][0].numpy().tobytes() for i in range(200)}
    assert seen == variants


def test_patches_are_a_pure_function_of_seed_and_index(tmp_path):
    _block_pairs(tmp_path, [(30, 40), (24, 20)])
    a = PatchDataset(tmp_path, lr_patch=8, length=64, seed=11)
    b = pickle.loads(pickle.dumps(PatchDataset(tmp_path, lr_patch=8, length=64, seed=11)))
    c = PatchDataset(tmp_path, lr_patch=8, length=64, seed=12)
    for i in (0, 5, 63, 17):  # any order
        assert torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][1], c[i][1]) for i in range(8))
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2)
    direct = torch.stack([a[i][0] for i in range(64)])
    assert torch.equal(torch.cat([lr for lr, _ in loader]), direct)
    with pytest.raises(IndexError):
        a[64]


def test_patch_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="degrade_split"):
        PatchDataset(tmp_path, length=4)
    _block_pairs(tmp_path, [(10, 12)])
    with pytest.raises(ValueError, match="smaller than lr_patch=48"):
        PatchDataset(tmp_path, lr_patch=48, length=4)
