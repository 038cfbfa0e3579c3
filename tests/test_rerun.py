"""Re-running a finished training stage retrains it (what `dvc repro -f` means for a persisted checkpoint),
while an unfinished or extended run resumes; on the demo, `dvc repro -f` and `dvc exp run -S` both work
from a finished pipeline. The stage scripts also run under `.venv/bin/python` when `python` lacks torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, edit_params, make_prepared, tool_env
from srmap.checkpoint import load_checkpoint, save_checkpoint
from srmap.nets import GeneratorConfig
from srmap.options import PretrainOptions
from srmap.train import pretrain

TINY_G = GeneratorConfig(stem_width=8, feature_widths=(8, 8, 8), blocks_per_stage=(1,), compression=2, kernel_size=3)


def _kw(data_dir, out_dir, **over):
    """pretrain()'s arguments: a tiny PretrainOptions record (``over`` replaces fields) and the run's paths."""
    opts = dict(seed=0, batch_size=4, lr_patch=8, lr=1e-3, betas=[0.9, 0.999], epochs=1, iters_per_epoch=2,
                milestones=[1], lr_gamma=0.5, ckpt_every=100, log_every=1, workers=0, max_bad_steps=3, amp=False,
                channels_last=False, compile=False, noise=True)
    return {"opts": PretrainOptions(**{**opts, **over}), "data_dir": data_dir, "out_dir": out_dir,
            "gen_cfg": TINY_G, "device": "cpu"}


def _resumed_from(out: Path):
    return json.loads((out / "training_options.json").read_text())["resumed_from_step"]


def test_finished_run_retrains_unfinished_and_extended_runs_resume(tmp_path):
    data = make_prepared(tmp_path / "prepared")
    out = tmp_path / "run"
    pretrain(**_kw(data, out))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["finished"] is True and ckpt["step"] == 2
    (out / "generator.pt").unlink()  # as `dvc repro -f` removes the stage's outputs
    with pytest.warns(RuntimeWarning, match="finished run.*from scratch"):
        pretrain(**_kw(data, out))
    assert _resumed_from(out) is None and (out / "generator.pt").is_file()
    # killed after the last step but before generator.pt: not finished, so it resumes
    save_checkpoint(out / "checkpoint.pt", {**load_checkpoint(out / "checkpoint.pt"), "finished": False})
    pretrain(**_kw(data, out))
    assert _resumed_from(out) == 2
    pretrain(**_kw(data, out, epochs=2))  # more epochs continue a finished run
    assert _resumed_from(out) == 2 and load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_stage_script_reexecutes_under_the_project_venv(tmp_path):
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.skip("no system python3")
    probe = subprocess.run([system, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip("the system python3 has torch itself")
    root = tmp_path / "checkout"
    venv = Path(sys.prefix)  # the venv running the tests stands in for the checkout's .venv
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    (root / ".venv" / "lib").symlink_to(venv / "lib")
    shutil.copy(venv / "pyvenv.cfg", root / ".venv" / "pyvenv.cfg")
    script = tmp_path / "stage.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom srmap.venv import use_project_venv\n"
                      f"use_project_venv({str(root)!r})\nimport torch\nprint('ran with torch', sys.argv[1:])\n")
    proc = subprocess.run([system, str(script), "--profile", "demo"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran with torch ['--profile', 'demo']"


def _lighten_demo(params: Path) -> None:
    """Cut the demo's training to 50 + 25 steps in ``params`` (comments kept)."""

    def cut(doc) -> None:
        doc["demo"]["pretrain"].update(epochs=2, iters_per_epoch=25)
        doc["demo"]["pretrain"]["milestones"] = [1]
        doc["demo"]["train_gan"].update(epochs=1, iters_per_epoch=25)
        doc["demo"]["train_gan"]["milestones"] = []

    edit_params(params, cut)


@pytest.mark.slow
def test_forced_repro_and_exp_run_from_a_finished_demo(demo_run: Path, tmp_path):
    clone = tmp_path / "srmap"
    shutil.copytree(demo_run, clone, symlinks=True)
    env = tool_env(clone)
    _lighten_demo(clone / "params.yaml")  # demo_run ran the demo as shipped; this test needs only the mechanics
    proc = subprocess.run(["dvc", "repro", "-f"], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = re.findall(r"^  (\w+):\n    cmd:", (clone / "dvc.yaml").read_text(), re.M)
    assert all(f"Running stage '{stage}'" in proc.stdout for stage in stages), proc.stdout[-3000:]
    gan = clone / "models" / "demo" / "train_gan"
    for trained in (clone / "models" / "demo" / "pretrain", gan):
        assert _resumed_from(trained) is None  # forced: retrained from scratch, not "resumed" at the end
    assert list((gan / "monitor").glob("step_*.png")) and (gan / "generator.pt").is_file()
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "finished"], cwd=clone,
                   check=True)
    proc = subprocess.run(["dvc", "exp", "run", "-S", "demo.train_gan.image_every=20"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage 'train_gan'" in proc.stdout
    assert list((gan / "monitor").glob("step_*.png"))
    assert (clone / "results" / "demo" / "metrics.json").is_file()


def test_every_stage_script_switches_to_the_project_venv_first():
    for script in sorted((ROOT / "pipeline").glob("*.py")):
        text = script.read_text()
        assert "use_project_venv()" in text, script.name
        assert text.index("use_project_venv()") < text.index("from srmap.config import"), script.name
