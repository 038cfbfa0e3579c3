"""Tiled upscaling, generator loading (both formats, pickle safety) and the upscale command."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from srmap.checkpoint import save_checkpoint, save_generator
from srmap.imageio import read_rgb8
from srmap.checkpoint import load_generator
from srmap.inference import upscale_command, upscale_image, upscale_tensor
from srmap.nets import Generator, GeneratorConfig

TINY = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(2,), compression=2, kernel_size=3)


def _random_generator(seed=0):
    torch.manual_seed(seed)
    G = Generator(TINY)
    with torch.no_grad():
        for p in G.parameters():  # the to_rgb layers start at zero: make every path matter
            p.add_(torch.randn_like(p) * 0.1)
    G.set_noise_scales(10.0)  # in the networks' 0-255 units
    return G.eval()


@pytest.fixture(scope="module")
def G():
    return _random_generator()


def _lr(h=21, w=27, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_tiled_equals_untiled_with_noise(G):
    lr = _lr()
    full = upscale_tensor(G, lr, seed=7, noise_scale=1.0)
    assert full.shape == (1, 3, 84, 108)
    tiled = upscale_tensor(G, lr, seed=7, noise_scale=1.0, tile=8, tile_pad=G.receptive_radius)
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upscale_tensor(G, lr, seed=7, tile=8, tile_pad=None), tiled)  # None = the radius
    # Different seeds really change the output, so the comparison above is not vacuous.
    assert (upscale_tensor(G, lr, seed=8) - full).abs().max() > 1e-3


def test_short_tile_pad_warns_and_differs(G):
    lr = _lr()
    full = upscale_tensor(G, lr, seed=7)
    with pytest.warns(UserWarning, match="receptive radius"):
        short = upscale_tensor(G, lr, seed=7, tile=8, tile_pad=1)
    assert (short - full).abs().max() > 1e-4


def test_tiled_seed_none_shares_one_noise_field(G, monkeypatch):
    """seed=None draws one seed for the whole image: every tile is called with that same seed."""
    seeds, forward = [], type(G).forward

    def recording(self, y, seed=None, **kw):
        seeds.append(seed)
        return forward(self, y, seed=seed, **kw)

    monkeypatch.setattr(type(G), "forward", recording)
    lr = _lr(12, 12)
    a = upscale_tensor(G, lr, seed=None, tile=5, tile_pad=G.receptive_radius)
    assert len(seeds) == 9 and seeds[0] is not None and len(set(seeds)) == 1  # 3 x 3 tiles, one seed
    seeds.clear()
    b = upscale_tensor(G, lr, seed=None, tile=5, tile_pad=G.receptive_radius)
    assert len(set(seeds)) == 1 and (a - b).abs().max() > 1e-4  # a fresh draw for each call
    monkeypatch.undo()
    # b's tiles all used seeds[0]; the untiled image with that seed is the same picture
    torch.testing.assert_close(b, upscale_tensor(G, lr, seed=int(seeds[0])), atol=1e-5, rtol=1e-5)


def test_upscale_image_uint8_and_half_needs_cuda(G):
    lr = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    out = upscale_image(G, lr, seed=0, noise_scale=0.0, tile=0, tile_pad=16, device="cpu")
    assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
    ref = upscale_tensor(G, torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, seed=0, noise_scale=0.0)
    expect = (ref.clamp(0, 1) * 255).round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(out, expect)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        upscale_image(G, lr, seed=0, noise_scale=0.0, tile=0, tile_pad=16, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        upscale_image(G, lr, seed=0, noise_scale=0.0, tile=0, tile_pad=16, device="cpu", precision="half")


def test_upscale_image_bf16_on_cpu_is_close_to_fp32(G):
    """--precision bf16 runs under CPU autocast: the result differs from fp32 (so it really ran in bf16),
    by a few levels at most on this generator."""
    lr = (np.random.default_rng(1).random((12, 12, 3)) * 255).astype(np.uint8)
    fp32 = upscale_image(G, lr, seed=3, noise_scale=1.0, tile=0, tile_pad=None, device="cpu").astype(int)
    bf16 = upscale_image(G, lr, seed=3, noise_scale=1.0, tile=0, tile_pad=None, device="cpu",
                         precision="bf16").astype(int)
    diff = np.abs(bf16 - fp32)
    assert diff.max() > 0 and np.mean(diff) < 3, (diff.max(), diff.mean())


def test_load_generator_both_formats(tmp_path, G):
    lr = _lr(6, 7)
    ref = upscale_tensor(G, lr, seed=1)
    save_generator(tmp_path / "g.pt", G, TINY, {"stage": "train_gan"})
    save_checkpoint(tmp_path / "ckpt.pt", {"gen_config": dataclasses.asdict(TINY), "G": G.state_dict(), "step": 3})
    for name in ("g.pt", "ckpt.pt"):
        H = load_generator(tmp_path / name)
        assert not H.training and not any(p.requires_grad for p in H.parameters())
        torch.testing.assert_close(upscale_tensor(H, lr, seed=1), ref)


def test_load_generator_bad_files(tmp_path, G):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_generator(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_generator(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"other\.pt.*gen_config"):
        load_generator(tmp_path / "other.pt")
    bad = dataclasses.asdict(TINY) | {"stem_width": 16}
    save_checkpoint(tmp_path / "mismatch.pt", {"gen_config": bad, "G": G.state_dict()})
    with pytest.raises(ValueError, match="mismatch.pt"):
        load_generator(tmp_path / "mismatch.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_crafted_pickle_does_not_execute(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"format": "srmap-generator/1", "config": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_generator(tmp_path / "evil.pt")
    assert not marker.exists()


def _write(path, arr):
    Image.fromarray(arr).save(path)


def test_upscale_command_skips_bad_file_and_exits_nonzero(tmp_path, G, capsys):
    save_generator(tmp_path / "g.pt", G, TINY, {})
    src = tmp_path / "in"
    src.mkdir()
    good = (np.random.default_rng(1).random((9, 11, 3)) * 255).astype(np.uint8)
    _write(src / "a.png", good)
    (src / "b.png").write_bytes(b"\x89PNG broken")
    _write(src / "c.jpg", good)
    out = tmp_path / "out"
    rc = upscale_command(src, out, tmp_path / "g.pt", samples=1, noise_scale=0.0)
    err = capsys.readouterr().err
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "c_x4.png"]
    bad_lines = [line for line in err.splitlines() if "b.png" in line]
    assert len(bad_lines) == 1 and "skipped" in bad_lines[0]
    expect = upscale_image(G, good, seed=0, noise_scale=0.0, tile=0, tile_pad=16, device="cpu")
    np.testing.assert_array_equal(read_rgb8(out / "a_x4.png"), expect)


def test_upscale_command_samples_and_tiles(tmp_path, G):
    save_generator(tmp_path / "g.pt", G, TINY, {})
    lr = (np.random.default_rng(2).random((14, 10, 3)) * 255).astype(np.uint8)
    _write(tmp_path / "x.png", lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tile_pad >= receptive radius: no warning
        rc = upscale_command(tmp_path / "x.png", tmp_path / "o", tmp_path / "g.pt", samples=2, seed=5, tile=6,
                             tile_pad=G.receptive_radius)
    assert rc == 0
    s0, s1 = read_rgb8(tmp_path / "o" / "x_s0.png"), read_rgb8(tmp_path / "o" / "x_s1.png")
    full = upscale_image(G, lr, seed=6, noise_scale=1.0, tile=0, tile_pad=0, device="cpu")
    assert np.abs(s1.astype(int) - full.astype(int)).max() <= 1  # seed + k; tiling within float rounding
    assert (s0 != s1).any()


def test_upscale_command_bad_checkpoint_or_input(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    assert upscale_command(tmp_path / "x.png", tmp_path / "o", tmp_path / "missing.pt") == 2
    assert "missing.pt" in capsys.readouterr().err
    assert upscale_command(tmp_path / "nowhere", tmp_path / "o", tmp_path / "missing.pt") == 2
    assert "nowhere" in capsys.readouterr().err
    assert upscale_command(tmp_path / "x.png", tmp_path / "o", tmp_path / "missing.pt", precision="fp16") == 2
    assert "CUDA" in capsys.readouterr().err
