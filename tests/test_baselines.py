"""Published baselines: spandrel-loaded checkpoints in the official key layouts (fabricated, random weights),
tiling, refusals, the verified weight download, and external result folders."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srmap import baselines
from srmap.baselines import count_samples, fetch_weights
from srmap.loaders import PublishedModel, load_sr_model
from srmap.download import ChecksumError
from srmap.inference import upscale_tensor


def _esrgan(num_blocks: int = 1, scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ESRGAN (8 features) with random weights, in the original ESRGAN ('old arch') key layout."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(num_filters=8, num_blocks=num_blocks, scale=scale)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _basicsr_layout(old: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """The same weights under BasicSR's RRDBNet names (conv_first, body.i.rdbj.convk, conv_body, conv_up1, ...)."""
    top = {"model.0": "conv_first", f"model.1.sub.{num_blocks}": "conv_body", "model.3": "conv_up1",
           "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}
    new = {}
    for key, value in old.items():
        prefix, kind = key.rsplit(".", 1)
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0", prefix)
        name = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}" if m else top[prefix]
        new[f"{name}.{kind}"] = value
    return new


@pytest.fixture(scope="module")
def esrgan_files(tmp_path_factory):
    """One fabricated ESRGAN saved four ways: original layout, BasicSR layout, params_ema-wrapped, safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("esrgan")
    old = _esrgan()
    basicsr = _basicsr_layout(old, 1)
    files = {"original": folder / "esrgan_old.pth", "basicsr": folder / "esrgan_basicsr.pth",
             "params_ema": folder / "esrgan_ema.pth", "safetensors": folder / "esrgan.safetensors"}
    torch.save(old, files["original"])
    torch.save(basicsr, files["basicsr"])
    torch.save({"params_ema": basicsr, "params": {k: torch.zeros_like(v) for k, v in basicsr.items()}},
               files["params_ema"])
    save_file(basicsr, str(files["safetensors"]))
    return files


def _spandrel_reference(path, lr: torch.Tensor) -> torch.Tensor:
    from spandrel import ModelLoader

    return ModelLoader().load_from_file(path)(lr)


@pytest.mark.parametrize("layout", ["original", "basicsr", "params_ema", "safetensors"])
def test_every_layout_loads_and_equals_spandrels_own_call(esrgan_files, layout):
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    model = load_sr_model(esrgan_files[layout])
    assert isinstance(model, PublishedModel) and model.deterministic
    assert model.architecture == "ESRGAN" and model.scale == 4
    ours = upscale_tensor(model, lr)
    assert ours.shape == (1, 3, 48, 40)
    torch.testing.assert_close(ours, _spandrel_reference(esrgan_files[layout], lr), rtol=0, atol=0)
    # every layout holds the same weights, so every layout gives the same image
    torch.testing.assert_close(ours, _spandrel_reference(esrgan_files["original"], lr), rtol=0, atol=0)


def test_params_ema_is_preferred_over_params(esrgan_files):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = upscale_tensor(load_sr_model(esrgan_files["params_ema"]), lr)
    assert out.std() > 0  # the zeroed 'params' copy would give a constant image


def test_tiles_equal_the_whole_image_at_the_receptive_radius(esrgan_files):
    model = load_sr_model(esrgan_files["original"])
    assert model.receptive_radius == 15 * 1 + 4
    lr = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    whole = upscale_tensor(model, lr)
    tiled = upscale_tensor(model, lr, tile=16, tile_pad=model.receptive_radius)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
    # a pad well inside the receptive field changes the seams: the radius is not vacuous
    with pytest.warns(UserWarning, match="receptive radius"):
        rough = upscale_tensor(model, lr, tile=16, tile_pad=2)
    assert (rough - whole).abs().max() > 1e-4


def test_a_foreign_file_gets_one_short_line(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({f"encoder.layer{i}.weight": torch.zeros(2) for i in range(700)}, path)
    with pytest.raises(ValueError) as info:
        load_sr_model(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert str(path) in msg and "700 key(s)" in msg


def test_a_x2_model_is_refused(tmp_path):
    path = tmp_path / "x2.pth"
    torch.save(_esrgan(scale=2), path)
    with pytest.raises(ValueError, match=r"x2.*expected x4"):
        load_sr_model(path)


def test_non_finite_weights_are_refused(tmp_path):
    state = _esrgan()
    state["model.3.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_sr_model(path)


def test_weights_download_verifies_the_published_prefix(server, monkeypatch, tmp_path):
    base, handler = server
    payload = b"fabricated weights " * 1000
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(baselines.WEIGHTS, "esrgan", baselines.Weights(
        slug="esrgan", label="ESRGAN", file=f"fake-{digest[:8]}.pth", url="http://127.0.0.1:9/unused",
        sha256=digest[:8], size=None, source="test"))
    handler.files[f"fake-{digest[:8]}.pth"] = payload
    path = fetch_weights("esrgan", tmp_path / "baselines", base_url=base, progress=False)
    assert path.read_bytes() == payload
    # a hand-placed copy is used without a request; a wrong one is refused
    handler.log.clear()
    assert fetch_weights("esrgan", tmp_path / "baselines", base_url=base, progress=False) == path
    assert handler.log == []
    path.write_bytes(b"something else")
    with pytest.raises(ChecksumError, match=digest[:8]):
        fetch_weights("esrgan", tmp_path / "baselines", base_url=base, progress=False)


def test_missing_weights_offline_name_the_file_the_folder_and_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fetch_weights("rrdb", tmp_path / "models" / "baselines", download=False)
    msg = str(info.value)
    meta = baselines.WEIGHTS["rrdb"]
    assert meta.file in msg and str(tmp_path / "models" / "baselines") in msg and meta.url in msg


def test_recorded_weights_are_the_official_basicsr_files():
    for meta in baselines.WEIGHTS.values():
        # BasicSR's naming: <name>-<first 8 hex digits of the SHA-256>.pth
        assert meta.file.endswith(f"-{meta.sha256}.pth"), meta
        assert meta.url.startswith("https://")
    with pytest.raises(ValueError, match="known: esrgan, rrdb"):
        baselines.weights_path("edsr", Path("."))


@pytest.mark.parametrize("layout,names,expected", [
    ("simple", ["a_s0.png", "a_s1.png", "a_s2.png", "b_s0.png"], 3),
    ("challenge", ["000000_sample00000.png", "000000_sample00001.png"], 2),
    ("single", ["a.png", "b.png"], 1),
])
def test_count_samples_in_released_result_folders(tmp_path, layout, names, expected):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert count_samples(["a", "b"], tmp_path) == expected


def test_count_samples_refuses_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        count_samples(["a"], tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no SR image"):
        count_samples(["a"], tmp_path)


def test_uint8_path_matches_spandrel_to_the_level(esrgan_files):
    from srmap.inference import upscale_image

    lr = np.random.default_rng(4).integers(0, 256, (10, 9, 3), dtype=np.uint8)
    model = load_sr_model(esrgan_files["basicsr"])
    ours = upscale_image(model, lr, seed=None, noise_scale=0.0, tile=0, tile_pad=None, device="cpu")
    ref = _spandrel_reference(esrgan_files["basicsr"], torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)
    ref = (ref.clamp(0, 1) * 255).round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------ srmap upscale with published models

@pytest.mark.parametrize("layout", ["original", "basicsr", "params_ema"])
def test_srmap_upscale_output_equals_spandrels_call(esrgan_files, layout, tmp_path):
    from PIL import Image

    from srmap.inference import upscale_command

    lr = np.random.default_rng(5).integers(0, 256, (14, 11, 3), dtype=np.uint8)
    Image.fromarray(lr).save(tmp_path / "in.png")
    assert upscale_command(tmp_path / "in.png", tmp_path / "out", esrgan_files[layout], tile=8, tile_pad=None) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "in_x4.png"))
    ref = _spandrel_reference(esrgan_files[layout], torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_array_equal(ours, (ref * 255).round()[0].permute(1, 2, 0).to(torch.uint8).numpy())


def test_srmap_upscale_refuses_samples_for_a_deterministic_model(esrgan_files, tmp_path, capsys):
    from PIL import Image

    from srmap.inference import upscale_command

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    assert upscale_command(tmp_path / "in.png", tmp_path / "out", esrgan_files["basicsr"], samples=3) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deterministic ESRGAN" in err and "--samples must be 1" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the baselines stage, end to end

def _valid_pairs(root: Path, stems=("a", "b")) -> None:
    """Smooth random 64x48 HR validation images and their MATLAB-bicubic x4 LR, as degrade writes them."""
    from PIL import Image

    from srmap.resize import imresize

    rng = np.random.default_rng(6)
    for sub in ("hr", "lr"):
        (root / sub).mkdir(parents=True)
    for stem in stems:
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        hr = np.asarray(Image.fromarray(coarse).resize((64, 48), Image.BICUBIC))
        Image.fromarray(hr).save(root / "hr" / f"{stem}.png")
        Image.fromarray(imresize(hr, 0.25)).save(root / "lr" / f"{stem}.png")


def _stage(clone: Path, edit) -> subprocess.CompletedProcess:
    """Run pipeline/baselines.py in ``clone`` after ``edit(params['demo']['baselines'])``."""
    import yaml

    from conftest import tool_env

    doc = yaml.safe_load((clone / "params.yaml").read_text())
    edit(doc["demo"]["baselines"])
    (clone / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run([sys.executable, "pipeline/baselines.py"], cwd=clone, env=tool_env(clone),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stage_clone(tmp_path_factory, esrgan_files):
    """A fresh clone with synthetic validation pairs, a fabricated ESRGAN file and a released-results folder."""
    import shutil

    from PIL import Image

    from conftest import clone_repo

    clone = clone_repo(tmp_path_factory.mktemp("baselines") / "srmap")
    _valid_pairs(clone / "data" / "demo" / "prepared" / "valid")
    shutil.copy(esrgan_files["basicsr"], clone / "esrgan_fabricated.pth")
    released = clone / "released" / "NCSR"
    released.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for stem in ("a", "b"):
        hr = np.asarray(Image.open(clone / "data" / "demo" / "prepared" / "valid" / "hr" / f"{stem}.png"))
        for k in range(3):
            noisy = np.clip(hr.astype(int) + rng.integers(-12, 13, hr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(released / f"{stem}_s{k}.png")
    return clone


def test_baselines_stage_scores_a_checkpoint_and_released_results(stage_clone):
    def edit(b):
        b["checkpoints"] = {"ESRGAN (fabricated)": "esrgan_fabricated.pth"}
        b["external"] = {"NCSR": "released/NCSR"}
        b["tile"], b["tile_pad"] = 8, None

    proc = _stage(stage_clone, edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = stage_clone / "results" / "demo" / "baselines"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["bicubic", "bicubic_projected", "esrgan_fabricated", "ncsr"]
    for slug, leaves in metrics.items():
        assert all(re.fullmatch(r"[a-z0-9_]+", k) and isinstance(v, (int, float)) for k, v in leaves.items()), slug
    assert metrics["ncsr"]["samples"] == 3 and metrics["ncsr"]["diversity"] > 0
    assert metrics["esrgan_fabricated"]["samples"] == 1 and metrics["esrgan_fabricated"]["diversity"] == 0
    info = json.loads((out / "eval" / "methods.json").read_text())
    assert [m["label"] for m in info["methods"]] == ["Bicubic", "Bicubic + projection", "ESRGAN (fabricated)", "NCSR"]
    by_slug = {m["slug"]: m for m in info["methods"]}
    assert by_slug["ncsr"]["sr_dir"].endswith("released/NCSR") and by_slug["ncsr"]["consistency"] == "none"
    assert by_slug["bicubic_projected"]["consistency"] == "project"
    assert (out / "eval" / "sr" / "esrgan_fabricated" / "a.png").is_file()
    assert not (out / "eval" / "sr" / "ncsr").exists()  # released results are scored where they are


def test_baselines_stage_missing_official_weights_is_one_line(stage_clone):
    def edit(b):
        b["models"], b["download"] = ["esrgan"], False
        b["checkpoints"], b["external"] = {}, {}

    proc = _stage(stage_clone, edit)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    meta = baselines.WEIGHTS["esrgan"]
    assert meta.file in err[0] and "models/baselines" in err[0] and meta.url in err[0]


def test_baselines_stage_missing_external_folder_is_one_line(stage_clone):
    def edit(b):
        b["models"], b["checkpoints"], b["external"] = [], {}, {"SRFlow": "released/SRFlow"}

    proc = _stage(stage_clone, edit)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "released/SRFlow" in proc.stderr
