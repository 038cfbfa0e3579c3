"""Faults a new user meets, each ending in one line and a documented exit status, with no user file lost:
output collisions, odd folder entries, interrupts, full disks, memory, offline downloads, device flags,
and numbers as people write them in params.yaml. Every input is small and made here."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import ROOT, tool_env
from srmap.checkpoint import save_checkpoint, save_generator
from srmap.cli import build_parser, main
from srmap.config import ConfigError, load_params, read_yaml, stage_main, validate, yaml12_numbers
from srmap.imageio import read_image, write_png
from srmap.nets import Generator, GeneratorConfig
from srmap.utils import DiskFullError, atomic_write_text

TINY = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(2,), compression=2, kernel_size=3)


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    torch.manual_seed(0)
    G = Generator(TINY).eval()
    path = tmp_path_factory.mktemp("g") / "g.pt"
    save_generator(path, G, TINY, {})
    return path


def _img(h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _upscale(*args):
    return main(["upscale", *map(str, args), "--device", "cpu", "--noise-scale", "0"])


# -- never overwrite what we did not write --------------------------------------------------------------------------


def test_existing_output_is_kept_unless_overwrite(tmp_path, gen_file, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "coffee.png", _img())
    mine = _img(32, 32, seed=9)
    write_png(photos / "coffee_x4.png", mine)  # the user's own file, with the name our output would have
    assert _upscale(photos, "-o", photos, "--checkpoint", gen_file) == 1
    err = capsys.readouterr().err
    np.testing.assert_array_equal(read_image(photos / "coffee_x4.png").rgb, mine)  # untouched
    assert "coffee_x4.png already exists" in err and "--overwrite" in err
    assert "coffee_x4.png: named like the output of coffee" in err  # and it is not read as an input
    assert sorted(p.name for p in photos.iterdir()) == ["coffee.png", "coffee_x4.png"]  # no coffee_x4_x4.png
    assert _upscale(photos, "-o", photos, "--checkpoint", gen_file, "--overwrite") == 1  # the user's file: skipped
    assert read_image(photos / "coffee_x4.png").rgb.shape == (32, 32, 3)
    assert not np.array_equal(read_image(photos / "coffee_x4.png").rgb, mine)  # replaced, as asked
    assert sorted(p.name for p in photos.iterdir()) == ["coffee.png", "coffee_x4.png"]


def test_running_twice_into_the_input_folder_reads_no_output(tmp_path, gen_file, capsys):
    write_png(tmp_path / "a.png", _img())
    assert _upscale(tmp_path, "-o", tmp_path, "--checkpoint", gen_file) == 0
    first = (tmp_path / "a_x4.png").read_bytes()
    assert _upscale(tmp_path, "-o", tmp_path, "--checkpoint", gen_file) == 1  # a_x4.png exists: said, kept
    assert (tmp_path / "a_x4.png").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_x4.png"]
    assert "a_x4.png already exists" in capsys.readouterr().err


# -- say what was skipped --------------------------------------------------------------------------------------------


def test_odd_folder_entries_are_named_and_the_exit_status_says_so(tmp_path, gen_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "good.png", _img())
    (src / "loop.png").symlink_to(src / "loop.png")
    (src / "dangling.png").symlink_to(tmp_path / "gone.png")
    (src / "folder.png").mkdir()
    rc = _upscale(src, "-o", tmp_path / "out", "--checkpoint", gen_file)
    err = capsys.readouterr().err
    assert rc == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good_x4.png"]
    for name, why in [("loop.png", "symbolic link loop"), ("dangling.png", "dangling link"),
                      ("folder.png", "a folder")]:
        lines = [ln for ln in err.splitlines() if name in ln]
        assert len(lines) == 1 and why in lines[0] and lines[0].startswith("srmap upscale: skipped"), err
    assert "3 of 4 input(s) skipped" in err


# -- one line for each fault -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, expect", [("gpu", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
                                            ("cuda", "torch sees no CUDA device here")])
def test_bad_device_is_one_usage_line(tmp_path, gen_file, capsys, device, expect):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(gen_file), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and expect in err[0], err


def test_device_auto_is_the_default_and_resolves():
    args = build_parser().parse_args(["upscale", "x", "-o", "y", "--checkpoint", "g.pt"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.tile_pad is None and args.precision == "fp32" and not args.overwrite
    half = build_parser().parse_args(["upscale", "x", "-o", "y", "--checkpoint", "g.pt", "--half"])
    assert half.precision == "fp16"


def test_upscale_help_documents_overwrite_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    out = capsys.readouterr().out
    assert "--overwrite" in out and "exit status" in out and "130 Ctrl-C" in out and "143 SIGTERM" in out


def test_ctrl_c_is_130_and_one_line_with_no_partial_file(tmp_path, gen_file, capsys):
    write_png(tmp_path / "x.png", _img())
    with mock.patch("srmap.inference.save_png", side_effect=KeyboardInterrupt):
        rc = _upscale(tmp_path / "x.png", "-o", tmp_path / "o", "--checkpoint", gen_file)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == "srmap upscale: interrupted (Ctrl-C); no partial output was left"
    assert "Traceback" not in "\n".join(err)
    assert list((tmp_path / "o").iterdir()) == []


def test_sigterm_during_a_write_is_143_and_leaves_no_temporary(tmp_path, gen_file, capsys):
    """A real SIGTERM to this process while the PNG is half written: the handler stops the write, the
    temporary file is removed, and the command answers 143 in one line."""
    write_png(tmp_path / "x.png", _img())

    def half_write(path, rgb):
        path.write_bytes(b"\x89PNG half")
        os.kill(os.getpid(), signal.SIGTERM)

    with mock.patch("srmap.inference.save_png", side_effect=half_write):
        rc = _upscale(tmp_path / "x.png", "-o", tmp_path / "o", "--checkpoint", gen_file)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 143 and err[-1] == "srmap upscale: stopped by SIGTERM; no partial output was left"
    assert list((tmp_path / "o").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command put the handler back


def test_a_killed_runs_temporary_file_is_removed_at_the_next_start(tmp_path, gen_file):
    write_png(tmp_path / "x.png", _img())
    (tmp_path / "o").mkdir()
    stale = tmp_path / "o" / ".x_x4.png.k3j2h1.png.tmp"  # what atomic_path names it
    stale.write_bytes(b"half a png from a SIGKILLed run")
    unrelated = tmp_path / "o" / ".notes.txt.tmp"
    unrelated.write_text("not ours")
    assert _upscale(tmp_path / "x.png", "-o", tmp_path / "o", "--checkpoint", gen_file) == 0
    assert not stale.exists() and unrelated.exists()


CPU_OOM = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from srmap.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_cpu_out_of_memory_names_the_file_and_suggests_tile(tmp_path, gen_file):
    """Under an address-space limit that leaves room for torch (about 3.4 GB here) but not for a
    1500x1500 image's activations (several GB at 6000x6000), the allocator's failure is one line with --tile."""
    write_png(tmp_path / "big.png", _img(1500, 1500))
    proc = subprocess.run([sys.executable, "-c", CPU_OOM, str(5 * 2**30), "upscale", str(tmp_path / "big.png"),
                           "-o", str(tmp_path / "o"), "--checkpoint", str(gen_file), "--device", "cpu"],
                          capture_output=True, text=True, env=tool_env(ROOT), timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if "big.png" in ln]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "out of host memory" in lines[0] and "--tile" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


# -- full disks --------------------------------------------------------------------------------------------------------


def test_full_disk_while_writing_a_checkpoint_names_file_and_space(tmp_path):
    """torch.save reports a full disk as "[enforce fail at inline_container.cc] ... file write failed"
    (pytorch/pytorch#76108); the error names the checkpoint and the free space, and the old file stays."""
    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    with mock.patch("srmap.checkpoint.torch.save", side_effect=failure), pytest.raises(DiskFullError) as exc:
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": 2})
    msg = str(exc.value)
    assert f"could not write {tmp_path / 'checkpoint.pt'}: no space left on device" in msg and " free in " in msg
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_full_disk_in_a_stage_is_one_line(tmp_path, capsys):
    """ENOSPC while losses.csv is written (it surfaces at fsync) ends the stage with one line and status 2."""
    def body(ctx):
        atomic_write_text(tmp_path / "losses.csv", "step\n1\n")

    with mock.patch("srmap.utils.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")), \
            pytest.raises(SystemExit) as exc:
        stage_main("pretrain", body, ["--params", str(ROOT / "params.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"srmap pretrain: error: could not write {tmp_path / 'losses.csv'}: no space left")
    assert not list(tmp_path.iterdir())


# -- interrupts in the stages ------------------------------------------------------------------------------------------


STAGE = textwrap.dedent("""
    import sys, time
    from srmap.config import stage_main
    from srmap.tracking import Tracker

    def body(ctx):
        with Tracker(ctx.root, stage="degrade", profile=ctx.profile, enabled=True, params={}):
            print("started", flush=True)
            time.sleep(60)

    stage_main("degrade", body, ["--params", sys.argv[1]])
""")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "srmap degrade: stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "srmap degrade: interrupted (Ctrl-C)")])
def test_stage_interrupt_is_one_line_and_the_mlflow_run_is_killed(tmp_path, sig, code, line):
    from mlflow.tracking import MlflowClient

    from srmap.runs import EXPERIMENT

    env = tool_env(ROOT, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # A suite started in the background by a non-interactive shell (`make test &`) inherits SIGINT ignored, and
    # Python then installs no Ctrl-C handler; the child gets the default back, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(ROOT / "params.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    mine = [ln for ln in err.splitlines() if "mlflow.store.db" not in ln]  # MLflow's note on creating a store
    assert proc.returncode == code and mine == [line], err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


# -- offline download --------------------------------------------------------------------------------------------------


def test_offline_download_gives_the_advice_first_and_fast(tmp_path):
    """No DNS (an unresolvable host): no retries with back-off, and the message starts with what to do."""
    import time

    from srmap.download import DownloadError, fetch_archive

    start = time.monotonic()
    with pytest.raises(DownloadError) as exc:
        fetch_archive("http://div2k.invalid/DIV2K_train_HR.zip", tmp_path / "DIV2K_train_HR.zip", size=None,
                      sha256=None, retries=5, backoff=1.0, progress=False)
    assert time.monotonic() - start < 5
    msg = str(exc.value)
    assert msg.startswith("Download http://div2k.invalid/DIV2K_train_HR.zip elsewhere and place it at ")
    assert "cannot resolve div2k.invalid" in msg and "\n" not in msg


# -- numbers as people write them --------------------------------------------------------------------------------------


def test_scientific_notation_is_a_number_for_us_dvc_and_snakemake(tmp_path):
    """PyYAML (YAML 1.1, what Snakemake's configfile uses) reads 1e-4 as a string; DVC (ruamel, YAML 1.2) reads a
    float. read_yaml and yaml12_numbers give the float, so the stages, DVC and the Snakefile agree."""
    import yaml
    from ruamel.yaml import YAML

    import re

    profile = load_params(ROOT / "params.yaml")[0]
    edited = re.sub(r"(?m)^(\s+lr:\s*)[^\s#]+", r"\g<1>1e-4", (ROOT / "params.yaml").read_text())  # every pretrain lr
    path = tmp_path / "params.yaml"
    path.write_text(edited)
    assert yaml.safe_load(edited)[profile]["pretrain"]["lr"] == "1e-4"  # the YAML 1.1 reading the issue met
    dvc_value = YAML(typ="safe").load(edited)[profile]["pretrain"]["lr"]
    _, section = load_params(path)
    snakemake_value = validate(yaml12_numbers(yaml.safe_load(edited)))[1]["pretrain"]["lr"]
    assert dvc_value == section["pretrain"]["lr"] == snakemake_value == 1e-4
    assert yaml12_numbers({"a": ["2E5", "-3e+2", ".5e1", "1e-4x", "v1e4"]}) == {"a": [2e5, -300.0, 5.0, "1e-4x",
                                                                                      "v1e4"]}


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\ndemo:\n  data: [1, 2\n")
    with pytest.raises(ConfigError, match=r"^params\.yaml: not valid YAML at line \d+, column \d+: "):
        read_yaml(path)


@pytest.mark.slow
def test_snakemake_yaml_error_points_at_params_yaml(tmp_path):
    subprocess.run(["git", "clone", "-q", str(ROOT), str(tmp_path / "c")], check=True)
    import shutil

    for name in ("Snakefile", "params.yaml", "dvc.yaml"):  # the working tree's versions, committed or not
        (tmp_path / "c" / name).write_text((ROOT / name).read_text())
    shutil.rmtree(tmp_path / "c" / "srmap")
    shutil.copytree(ROOT / "srmap", tmp_path / "c" / "srmap", ignore=shutil.ignore_patterns("__pycache__"))
    params = tmp_path / "c" / "params.yaml"
    params.write_text(params.read_text().replace("profile: demo", "profile: [demo", 1))
    proc = subprocess.run(["snakemake", "-n"], cwd=tmp_path / "c", capture_output=True, text=True,
                          env=tool_env(tmp_path / "c"), timeout=300)
    assert proc.returncode != 0
    assert "snakemake: error: params.yaml: not valid YAML at line" in proc.stdout + proc.stderr, proc.stderr[-2000:]
