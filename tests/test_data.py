"""The degrade stage's library code and PatchDataset (image files: tests/test_imageio.py)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from srmap.data import MANIFEST, PatchDataset, _dihedral
from srmap.prepare import degrade_split, fetch_skimage
from srmap.resize import imresize
from srmap.imageio import read_rgb8, write_png

MAXPIX = 10_000_000


def test_fetch_skimage_offline(tmp_path):
    paths = fetch_skimage(["chelsea", "motorcycle_left"], tmp_path, multiple=8)
    assert [p.name for p in paths] == ["chelsea.png", "motorcycle_left.png"]
    for p in paths:
        img = read_rgb8(p)
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
        src = read_rgb8(hr_dir / f"{stem}.png")
        if fmt == "npy":
            hr = np.load(tmp_path / "out" / "hr" / f"{stem}.npy", mmap_mode="r")
            lr = np.load(tmp_path / "out" / "lr" / f"{stem}.npy")
        else:
            hr = read_rgb8(tmp_path / "out" / "hr" / f"{stem}.png")
            lr = read_rgb8(tmp_path / "out" / "lr" / f"{stem}.png")
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


def test_hr_context_widens_the_hr_patch_around_the_same_crop_mirrored_past_the_edge(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    hr_img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "hr" / "0000.npy", hr_img)
    np.save(tmp_path / "lr" / "0000.npy", hr_img[::4, ::4])
    plain = PatchDataset(tmp_path, lr_patch=4, scale=4, length=64, seed=2)
    ring = PatchDataset(tmp_path, lr_patch=4, scale=4, length=64, seed=2, hr_context=8)
    padded = np.pad(hr_img, ((8, 8), (8, 8), (0, 0)), mode="symmetric")  # MATLAB imresize's boundary rule
    edges = 0
    for i in range(64):
        (lr_a, hr_a), (lr_b, hr_b) = plain[i], ring[i]
        assert torch.equal(lr_a, lr_b) and hr_b.shape == (3, 32, 32)
        assert torch.equal(hr_b[:, 8:-8, 8:-8], hr_a)  # the centre is the plain HR patch, same transform
        # the ring is the image around the patch: find the window of the padded image it came from
        window = hr_b.permute(1, 2, 0).numpy()
        found = [(y, x) for y in range(0, 40 - 16 + 1, 4) for x in range(0, 48 - 16 + 1, 4)  # LR-aligned crops
                 if any(np.array_equal(window, _dihedral(padded[y:y + 32, x:x + 32], op)) for op in range(8))]
        assert found, i
        edges += any(y in (0, 24) or x in (0, 32) for y, x in found)
    assert edges > 0  # some patches touch the image edge and read mirrored pixels
    with pytest.raises(ValueError, match="hr_context"):
        PatchDataset(tmp_path, lr_patch=4, length=4, hr_context=-1)



def test_patch_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="degrade_split"):
        PatchDataset(tmp_path, length=4)
    _block_pairs(tmp_path, [(10, 12)])
    with pytest.raises(ValueError, match="smaller than lr_patch=48"):
        PatchDataset(tmp_path, lr_patch=48, length=4)
