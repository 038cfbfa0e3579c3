"""params.yaml validation: unknown profile, missing key, bad type, malformed YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from srmap.config import ConfigError, Paths, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, doc) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid_for_every_profile():
    assert _params()["profile"] == "demo"  # CI runs the demo
    for name in ("demo", "study", "paper"):
        profile, section = load_params(ROOT / "params.yaml", name)
        assert profile == name and section["data"]["scale"] == 4


def test_paper_profile_carries_the_papers_settings():
    """The paper profile against facts from outside params.yaml: the authors' network sizes, their loss weights in
    0-255 units, and the report's patch and batch sizes."""
    import torch

    from srmap.nets import Critic, Generator, count_params
    from srmap.options import CriticConfig, GeneratorConfig

    _, p = load_params(ROOT / "params.yaml", "paper")
    with torch.device("meta"):
        G, D = Generator(GeneratorConfig(**p["model"]["generator"])), Critic(CriticConfig(**p["model"]["critic"]))
    # parameter counts of the authors' Generator() and of the critic their src/loss/Main.py builds (test_nets.py)
    assert (count_params(G), count_params(D)) == (20_933_504, 20_817_025)
    assert D.cfg.in_size == 4 * p["train_gan"]["lr_patch"] == 4 * 48  # report: 48x48 LR patches
    assert p["pretrain"]["batch_size"] == p["train_gan"]["batch_size"] == 64  # report: 64, two halves of 32
    # the authors' --loss 10*Fidelity and --r1_gamma 10 on 0-255 images, in our [0,1] units (docs/training.md)
    assert p["train_gan"]["alpha"] == 10 * 255 and p["train_gan"]["r1_gamma"] == pytest.approx(10 / 255**2, rel=1e-15)
    assert p["train_gan"]["epochs"] * p["train_gan"]["iters_per_epoch"] == 200_000  # report: 200 epochs of 1000
    assert p["evaluate"]["samples"] == 10  # NTIRE 2021: 10 samples per image
    assert p["data"]["train"] == [1, 800] and p["data"]["valid"] == [801, 900]  # DIV2K's own split


def test_study_profile_holds_out_the_demo_validation_images():
    """docs/study.md's claims rest on these: held-out images, the paper's patch size, pretrained LPIPS."""
    from srmap.prepare import SKIMAGE_IMAGES

    _, demo = load_params(ROOT / "params.yaml", "demo")
    _, s = load_params(ROOT / "params.yaml", "study")
    d = s["data"]
    assert d["source"] == "skimage" and d["valid"] == demo["data"]["valid"]
    assert set(d["train"]) <= set(SKIMAGE_IMAGES)
    # neither a validation image nor its twin (the other stereo view; the alias of chelsea) in training
    assert not set(d["train"]) & {*d["valid"], "motorcycle_right", "cat"}
    assert s["pretrain"]["lr_patch"] == s["train_gan"]["lr_patch"] == 48
    c = s["model"]["critic"]
    assert c["basis_size"] * 2 ** len(c["stage_widths"]) == 4 * 48
    assert s["evaluate"]["lpips_pretrained"] is True and s["evaluate"]["samples"] == 10
    assert s["baselines"]["models"] == []


def test_unknown_profile(tmp_path):
    doc = _params()
    doc["profile"] = "huge"
    with pytest.raises(ConfigError, match=r"unknown profile 'huge' \(expected one of: demo, paper, study\)"):
        load_params(_write(tmp_path, doc))


def test_missing_key_is_named(tmp_path):
    doc = _params()
    del doc["demo"]["pretrain"]["lr"]
    with pytest.raises(ConfigError, match=r"missing key 'demo\.pretrain\.lr' \(a number\)"):
        load_params(_write(tmp_path, doc))


def test_wrong_type_and_unknown_key(tmp_path):
    doc = _params()
    doc["demo"]["train_gan"]["alpha"] = "lots"
    with pytest.raises(ConfigError, match=r"'demo\.train_gan\.alpha' must be a number, got 'lots'"):
        load_params(_write(tmp_path, doc))
    doc = _params()
    doc["demo"]["evaluate"]["sampels"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'demo\.evaluate\.sampels'"):
        load_params(_write(tmp_path, doc))
    doc = _params()
    doc["demo"]["train_gan"]["adv_loss"] = "wgan"
    with pytest.raises(ConfigError, match=r"'demo\.train_gan\.adv_loss' must be one of"):
        load_params(_write(tmp_path, doc))


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML at line \d+, column \d+: "):
        load_params(_write(tmp_path, "profile: demo\ndemo: [unclosed\n"))


def test_stage_script_prints_one_line_and_exits_nonzero(tmp_path):
    doc = _params()
    del doc["demo"]["data"]["scale"]
    params = _write(tmp_path, doc)
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline" / "degrade.py"), "--params", str(params)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["srmap degrade: error: params.yaml: missing key 'demo.data.scale' (an integer)"], proc.stderr


def test_cli_profile_switch(tmp_path):
    from srmap.cli import main

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert main(["profile", "paper", "--params", str(params)]) == 0
    assert load_params(params)[0] == "paper"
    assert main(["profile", "nope", "--params", str(params)]) == 2
    assert load_params(params)[0] == "paper"


def test_paths_are_per_profile():
    a, b = Paths(ROOT, "demo"), Paths(ROOT, "paper")
    for attr in ("hr", "prepared", "pretrain", "train_gan", "results", "report"):
        assert getattr(a, attr) != getattr(b, attr)
        assert "demo" in getattr(a, attr).parts


def test_snakemake_rejects_an_unknown_profile_in_one_line():
    from conftest import tool_env

    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", "profile=huge"], cwd=ROOT,
                          env=tool_env(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "snakemake: error: params.yaml: unknown profile 'huge' (expected one of: demo, study, paper)" in proc.stderr


def test_only_scale_4_validates(tmp_path):
    """Every stage is built for x4; another scale fails at validation, in the stage scripts and in the Snakefile."""
    doc = _params()
    doc["demo"]["data"]["scale"] = 2
    msg = "params.yaml: key 'demo.data.scale' must be 4, got 2"
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, doc))
    assert str(err.value) == msg
    params = tmp_path / "params.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline" / "download.py"), "--params", str(params)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"srmap download: error: {msg}"], proc.stderr

    from conftest import tool_env

    override = _write(tmp_path, {"demo": {"data": {"scale": 2}}})
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", f"--configfile={override}"], cwd=ROOT,
                          env=tool_env(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"snakemake: error: {msg}" in proc.stderr, proc.stderr[-2000:]


def test_resources_live_outside_the_tracked_sections(tmp_path):
    _, p = load_params(ROOT / "params.yaml", "paper")
    assert set(p["resources"]["train_gan"]) == {"gpus", "cpus", "mem_mb", "runtime"}
    # every job fits a 24 h partition: the paper's 5-day GAN stage spans several jobs (profiles/slurm, docs/cluster.md)
    assert all(0 < r["runtime"] <= 1440 for r in p["resources"].values()), p["resources"]
    assert all("resources" not in p[stage] for stage in ("pretrain", "train_gan", "evaluate"))
    doc = _params()
    doc["demo"]["pretrain"]["resources"] = {"gpus": 1, "cpus": 2, "mem_mb": 4000, "runtime": 30}  # the old layout
    with pytest.raises(ConfigError, match=r"unknown key 'demo\.pretrain\.resources'"):
        load_params(_write(tmp_path, doc))
    doc = _params()
    doc["demo"]["resources"]["evaluate"]["mem_mb"] = "lots"
    with pytest.raises(ConfigError, match=r"key 'demo\.resources\.evaluate\.mem_mb' must be an integer, got 'lots'"):
        load_params(_write(tmp_path, doc))


# ------------------------------------------------------------------ training options records


def test_training_sections_are_the_options_records():
    import dataclasses

    from srmap.config import NUM, OPT_NUM, SCHEMA, options_schema
    from srmap.options import GanOptions, PretrainOptions

    for section, cls in (("pretrain", PretrainOptions), ("train_gan", GanOptions)):
        assert list(SCHEMA[section]) == [f.name for f in dataclasses.fields(cls)]
        for name in ("paper", "demo", "study"):
            assert set(_params()[name][section]) == set(SCHEMA[section]), (name, section)
    assert SCHEMA["train_gan"]["noise_init"] is OPT_NUM and SCHEMA["train_gan"]["alpha"] is NUM
    assert SCHEMA["pretrain"]["noise"] is bool and SCHEMA["pretrain"]["betas"] is list
    assert SCHEMA["train_gan"]["adv_loss"] is str

    @dataclasses.dataclass(frozen=True)
    class NewStage:  # a new hyper-parameter is one field: its schema follows
        warmup: int
        decay: float | None
        fancy: bool

    assert options_schema(NewStage) == {"warmup": int, "decay": OPT_NUM, "fancy": bool}

    @dataclasses.dataclass(frozen=True)
    class Unmapped:
        table: dict

    with pytest.raises(TypeError, match="no params.yaml type"):
        options_schema(Unmapped)


@pytest.mark.parametrize("section, key, value, expected", [
    ("pretrain", "batch_size", 0, "a positive integer"),
    ("pretrain", "betas", [0.9], r"two numbers in \[0, 1\)"),
    ("pretrain", "milestones", [0, 3], "positive epoch numbers"),
    ("pretrain", "lr", 0, "a number > 0"),
    ("train_gan", "batch_size", 15, "an even number"),
    ("train_gan", "ema_beta", 1.0, r"a number in \[0, 1\)"),
    ("train_gan", "workers", -1, "an integer >= 0"),
    ("train_gan", "r1_gamma", -1e-4, "a number >= 0"),
])
def test_out_of_range_training_options_name_the_key(tmp_path, section, key, value, expected):
    doc = _params()
    doc["demo"][section][key] = value
    with pytest.raises(ConfigError, match=rf"^params\.yaml: key 'demo\.{section}\.{key}' must be {expected}.*, got "):
        load_params(_write(tmp_path, doc))


def test_options_records_are_frozen_and_normalise_lists():
    import dataclasses

    from srmap.options import GanOptions, OptionError, PretrainOptions

    opts = PretrainOptions(**_params()["paper"]["pretrain"])
    assert opts.betas == (0.9, 0.999) and opts.milestones == (200,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 1.0
    gan = dict(_params()["paper"]["train_gan"])
    assert GanOptions(**gan).noise_init is None and GanOptions(**{**gan, "noise_init": 2}).noise_init == 2
    with pytest.raises(OptionError, match=r"noise_init: expected null .* got nan"):
        GanOptions(**{**gan, "noise_init": float("nan")})
    with pytest.raises(TypeError):
        GanOptions(**{**gan, "unknown": 1})  # a key that is not a field is refused by the dataclass itself
