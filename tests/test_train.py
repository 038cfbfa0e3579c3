"""Training loops and checkpoints: bit-exact resume, resume guard, NaN guard, atomic and safe checkpoint files.

Everything runs on CPU with a tiny generator/critic on 8x8 LR patches.
"""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_prepared
from srmap.checkpoint import load_checkpoint, save_checkpoint, save_generator
from srmap.nets import Generator
from srmap.options import GeneratorConfig
from srmap.options import GanOptions, PretrainOptions
from srmap.data import StepBatchSampler
from srmap.train import GAN_COLUMNS, PRETRAIN_COLUMNS, NonFiniteLossError, pretrain, train_gan
from srmap.train_utils import ema_update, lr_factor, parse_slurm_duration, stop_deadline

ROOT = Path(__file__).resolve().parents[1]
TINY_G = {"stem_width": 8, "feature_widths": [8, 8, 8], "blocks_per_stage": [1], "compression": 4,
          "kernel_size": 3}
TINY_C = {"basis_size": 2, "stage_widths": [4, 8, 8, 8], "blocks_per_stage": [1, 1, 1, 1], "epilog_width": 8,
          "latent_width": 8, "compression": 4, "kernel_size": 3}  # 32 px input


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Three smooth random 48x64 HR images and their MATLAB-bicubic x4 LR, as the degrade stage stores them."""
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def init_generator(tmp_path_factory):
    """A freshly initialised tiny generator saved in the srmap-generator/1 format."""
    torch.manual_seed(5)
    cfg = GeneratorConfig(**TINY_G)
    path = tmp_path_factory.mktemp("init") / "generator.pt"
    save_generator(path, Generator(cfg), cfg, {"stage": "test"})
    return path


RUN_KEYS = ("data_dir", "out_dir", "init_generator", "gen_cfg", "critic_cfg", "device")


def _call_kw(cls, kw):
    """Keyword arguments of a training call: the options record plus the run's paths, configs and device."""
    return {"opts": cls(**{k: v for k, v in kw.items() if k not in RUN_KEYS}),
            **{k: kw[k] for k in RUN_KEYS if k in kw}}


def pre_kw(data_dir, out_dir, **over):
    kw = dict(data_dir=data_dir, out_dir=out_dir, gen_cfg=TINY_G, seed=0, batch_size=4, lr_patch=8, lr=1e-3,
              betas=[0.9, 0.999], epochs=2, iters_per_epoch=3, milestones=[1], lr_gamma=0.5, noise=True,
              ckpt_every=100, log_every=2, workers=0, max_bad_steps=3, amp=True, channels_last=True, compile=False,
              device="cpu")
    return _call_kw(PretrainOptions, {**kw, **over})


def gan_kw(data_dir, out_dir, init_generator, **over):
    kw = dict(data_dir=data_dir, out_dir=out_dir, init_generator=init_generator, gen_cfg=TINY_G,
              critic_cfg=TINY_C, seed=1, batch_size=4, lr_patch=8, lr_g=1e-3, lr_d=1e-3, betas=[0.0, 0.99],
              alpha=2550.0, r1_gamma=1.5e-4, adv_loss="softplus", ema_beta=0.9, noise_init=5.0, fidelity_border=2,
              fidelity_clamp=False, fidelity_context=False, consistency="none", epochs=2,
              iters_per_epoch=2, milestones=[1],
              lr_gamma=0.5, image_every=2, ckpt_every=100, log_every=1, workers=0, max_bad_steps=3, amp=True,
              channels_last=True, compile=False, device="cpu")
    return _call_kw(GanOptions, {**kw, **over})


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class FakeTracker:
    """Records what the training loop sends to MLflow."""

    def __init__(self):
        self.metrics, self.artifacts = [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).is_file()
        self.artifacts.append((Path(path).name, artifact_path))


# ---------------------------------------------------------------------------
# Data order and schedule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_ranks_split_every_global_batch_and_keep_the_pairing(groups):
    single = StepBatchSampler(start_step=0, total_steps=3, batch_size=8, groups=groups)
    ranks = [StepBatchSampler(start_step=0, total_steps=3, batch_size=8, rank=r, world=2, groups=groups)
             for r in range(2)]
    for step, batch in enumerate(single):
        assert batch == list(range(8 * step, 8 * step + 8))
        parts = [rk.indices(step) for rk in ranks]
        # each rank's slice of each group, concatenated group by group, is the single-process batch
        per = 8 // groups // 2
        merged = [i for g in range(groups) for p in parts for i in p[g * per:(g + 1) * per]]
        assert merged == batch
    resumed = StepBatchSampler(start_step=2, total_steps=3, batch_size=8, groups=groups)
    assert list(resumed) == [list(range(16, 24))]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(start_step=0, total_steps=1, batch_size=6, world=4, groups=groups)


def test_lr_factor_is_a_step_function_of_the_milestones():
    assert [lr_factor(s, [3, 5], 0.5) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.25, 0.25]


# ---------------------------------------------------------------------------
# Bit-exact resume
# ---------------------------------------------------------------------------


def test_pretrain_kill_and_resume_is_bit_identical(data_dir, tmp_path):
    tracker = FakeTracker()
    full = pretrain(**pre_kw(data_dir, tmp_path / "full"), tracker=tracker)
    stopped = pretrain(**pre_kw(data_dir, tmp_path / "cut"), stop_after=3)
    assert stopped == tmp_path / "cut" / "checkpoint.pt" and not (tmp_path / "cut" / "generator.pt").exists()
    resumed = pretrain(**pre_kw(data_dir, tmp_path / "cut"))
    assert full.name == resumed.name == "generator.pt"
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert_same_state(a["optimizers"]["G"]["state"][0], b["optimizers"]["G"]["state"][0])
    # Step 3 split a logging window (log_every=2); the rows still match the uninterrupted run.
    assert (tmp_path / "full" / "losses.csv").read_text() == (tmp_path / "cut" / "losses.csv").read_text()
    rows = read_csv(tmp_path / "full" / "losses.csv")
    assert tuple(rows[0]) == PRETRAIN_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["lr"]) for r in rows] == [1e-3, 5e-4, 5e-4]  # milestone at epoch 1 = step 3
    assert all(float(r["l1"]) > 0 and r["skipped"] == "0" for r in rows)
    opts = json.loads((tmp_path / "cut" / "training_options.json").read_text())
    assert opts["resumed_from_step"] == 3 and opts["config"]["lr"] == 1e-3
    assert [s for s, _ in tracker.metrics] == [2, 4, 6]
    assert {"l1", "lr", "step_time_s", "patches_per_s", "skipped"} <= set(tracker.metrics[0][1])
    assert ("generator.pt", None) in tracker.artifacts


def test_pretrain_resume_with_dataloader_workers_matches(data_dir, tmp_path):
    full = pretrain(**pre_kw(data_dir, tmp_path / "full", epochs=1))
    pretrain(**pre_kw(data_dir, tmp_path / "cut", epochs=1, workers=2), stop_after=1)
    resumed = pretrain(**pre_kw(data_dir, tmp_path / "cut", epochs=1, workers=2))
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])


def test_gan_kill_and_resume_is_bit_identical(data_dir, init_generator, tmp_path):
    tracker = FakeTracker()
    full = train_gan(**gan_kw(data_dir, tmp_path / "full", init_generator), tracker=tracker)
    train_gan(**gan_kw(data_dir, tmp_path / "cut", init_generator), stop_after=1)
    resumed = train_gan(**gan_kw(data_dir, tmp_path / "cut", init_generator))
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert_same_state(a["D"], b["D"])
    assert_same_state(a["G"], b["G"])
    assert_same_state(a["G_ema"], b["G_ema"])  # the EMA resumes bit-exactly too
    init = load_checkpoint(init_generator)["state_dict"]
    assert not torch.equal(a["G"]["to_rgb.1.weight"], init["to_rgb.1.weight"])
    # generator.pt holds the EMA, not the raw weights; noise_init set every scale to 5 before training
    assert_same_state(load_checkpoint(full)["state_dict"], a["G_ema"])
    assert not torch.equal(a["G_ema"]["to_rgb.1.weight"], a["G"]["to_rgb.1.weight"])
    assert float(a["G_ema"]["stem.noise.scale"].mean()) == pytest.approx(5.0, abs=0.1)
    assert (tmp_path / "full" / "losses.csv").read_text() == (tmp_path / "cut" / "losses.csv").read_text()
    rows = read_csv(tmp_path / "full" / "losses.csv")
    assert tuple(rows[0]) == GAN_COLUMNS and [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r[c]) >= 0 for r in rows for c in ("fidelity", "generator", "critic", "r1"))
    assert [float(r["lr_d"]) for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]
    grids = sorted(p.name for p in (tmp_path / "full" / "monitor").glob("*.png"))
    assert grids == ["step_00000002.png", "step_00000004.png"]
    with Image.open(tmp_path / "full" / "monitor" / grids[0]) as im:
        assert im.size == (2 * 34 + 2, 3 * 34 + 2)  # 2 samples x rows LR / SR / HR of 32 px, 2 px padding
    assert ("step_00000002.png", "monitor") in tracker.artifacts and ("generator.pt", None) in tracker.artifacts
    assert {"fidelity", "generator", "critic", "r1", "lr_g", "lr_d", "patches_per_s", "noise_trunk",
            "noise_up_x4"} <= set(tracker.metrics[0][1])
    assert float(rows[0]["noise_stem"]) == pytest.approx(5.0, abs=0.1)


def test_a_run_shorter_than_image_every_still_writes_its_last_grid(data_dir, init_generator, tmp_path):
    """monitor/ is a declared DVC/Snakemake output: a run of 4 steps with image_every 10 (and one of 3 with 2)
    writes a grid at its last step, so the folder always exists."""
    train_gan(**gan_kw(data_dir, tmp_path / "short", init_generator, image_every=10))
    assert sorted(p.name for p in (tmp_path / "short" / "monitor").glob("*.png")) == ["step_00000004.png"]
    train_gan(**gan_kw(data_dir, tmp_path / "odd", init_generator, epochs=1, iters_per_epoch=3))
    assert sorted(p.name for p in (tmp_path / "odd" / "monitor").glob("*.png")) == ["step_00000002.png",
                                                                                    "step_00000003.png"]


@pytest.mark.parametrize("option", [{"consistency": "project"}, {"fidelity_clamp": True},
                                    {"fidelity_context": True, "fidelity_border": 0}, {"fidelity_border": 0}],
                         ids=["project", "clamp", "context", "whole_patch"])
def test_each_consistency_option_trains_and_changes_the_generator(data_dir, init_generator, tmp_path, option):
    """The #22 options of train_gan: each trains (bf16 autocast on, as in gan_kw) and changes G's weights."""
    if option.get("fidelity_clamp"):  # a G whose output leaves [0, 1] (its last toRGB starts at 0), so the clamp bites
        from srmap.checkpoint import load_generator

        G = load_generator(init_generator)
        torch.manual_seed(0)
        with torch.no_grad():
            G.to_rgb[-1].weight.normal_(0.0, 2.0)
        init_generator = tmp_path / "overshoot.pt"
        save_generator(init_generator, G, GeneratorConfig(**TINY_G), {"stage": "test"})
    base = load_checkpoint(train_gan(**gan_kw(data_dir, tmp_path / "base", init_generator)))["state_dict"]
    out = train_gan(**gan_kw(data_dir, tmp_path / "opt", init_generator, **option))
    rows = read_csv(tmp_path / "opt" / "losses.csv")
    assert all(np.isfinite(float(r[c])) for r in rows for c in ("fidelity", "generator", "critic"))
    changed = load_checkpoint(out)["state_dict"]
    assert any(not torch.equal(changed[k], base[k]) for k in base if changed[k].is_floating_point())
    if option.get("consistency") == "project":  # the losses see the projected output: consistent inside the band
        assert all(float(r["fidelity"]) < 1e-5 for r in rows), [r["fidelity"] for r in rows]
    else:
        assert all(float(r["fidelity"]) > 1e-4 for r in rows)


def test_fidelity_context_refuses_a_border_and_the_projection():
    from srmap.options import OptionError

    opts = gan_kw(Path("."), Path("."), Path("."))["opts"]
    with pytest.raises(OptionError, match="fidelity_border: expected 0 with fidelity_context"):
        dataclasses.replace(opts, fidelity_context=True)
    with pytest.raises(OptionError, match="consistency: expected none with fidelity_context"):
        dataclasses.replace(opts, fidelity_context=True, fidelity_border=0, consistency="project")


FLUSH_PROBE = """
import platform, sys, torch
from srmap.train_utils import flush_denormals
torch.set_num_threads(2)
sub = torch.full((1 << 22,), 1e-39)  # float32 subnormals, split across both threads by parallel_for
(sub * 1.0).sum()  # the OpenMP pool exists before any flag is set, as in a stage
torch.set_flush_denormal(True)  # torch's own call reaches the calling thread only
alone = (sub * 1.0 != 0).float().mean().item()
threads = flush_denormals()
after = (sub * 1.0 != 0).float().mean().item()
print(platform.machine(), alone, threads, after)
"""


def test_flush_denormals_reaches_every_openmp_thread():
    # A subprocess: the flag is per-thread process state that the rest of the suite should not inherit.
    out = subprocess.run([sys.executable, "-c", FLUSH_PROBE], capture_output=True, text=True, check=True).stdout
    machine, alone, threads, after = out.split()
    if machine not in ("x86_64", "AMD64"):
        pytest.skip(f"FTZ/DAZ is an x86 mode; this machine is {machine}")
    assert 0 < float(alone) < 1  # the worker thread still produced subnormals
    assert (int(threads), float(after)) == (2, 0.0)


def test_ema_update_is_the_authors_lerp():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.999)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.999 * b + 0.001 * m, rtol=0, atol=1e-7)


def test_pretrain_noise_off_keeps_every_scale_at_its_initial_value(data_dir, tmp_path):
    path = pretrain(**pre_kw(data_dir, tmp_path / "off", noise=False, epochs=1))
    state = load_checkpoint(path)["state_dict"]
    scales = [v for k, v in state.items() if k.endswith("noise.scale") or ".noise" in k and k.endswith(".scale")]
    assert scales and all(torch.equal(v, torch.zeros_like(v)) for v in scales)
    rows = read_csv(tmp_path / "off" / "losses.csv")
    assert all(float(r[c]) == 0 for r in rows for c in ("noise_stem", "noise_trunk", "noise_up_x2"))
    on = pretrain(**pre_kw(data_dir, tmp_path / "on", noise=True, epochs=1))
    moved = [v for k, v in load_checkpoint(on)["state_dict"].items() if k.endswith(".scale")]
    assert any(v.abs().max() > 0 for v in moved)  # with the noise on, L1 does move them


# ---------------------------------------------------------------------------
# Resume guard
# ---------------------------------------------------------------------------


def test_changed_config_trains_from_scratch_but_more_epochs_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(**pre_kw(data_dir, out, epochs=1))
    (out / ".checkpoint.pt.abc.pt.tmp").write_bytes(b"half a checkpoint from a killed run")
    pretrain(**pre_kw(data_dir, out, epochs=2, log_every=1))  # free keys: continue from step 3
    assert not list(out.glob(".*.tmp"))
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["resumed_from_step"] == 3 and opts["set_aside"] is None
    assert [int(r["step"]) for r in read_csv(out / "losses.csv")] == [2, 4, 5, 6]
    finished = load_checkpoint(out / "checkpoint.pt")
    with pytest.warns(RuntimeWarning, match=r"differs in: lr\b.*kept it as .*checkpoint\.step6\.config-changed\.pt"):
        pretrain(**pre_kw(data_dir, out, epochs=2, lr=2e-3))
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["resumed_from_step"] is None and [int(r["step"]) for r in read_csv(out / "losses.csv")] == [2, 4, 6]
    kept = load_checkpoint(out / "checkpoint.step6.config-changed.pt")  # the old run, untouched
    assert opts["set_aside"] == str(out / "checkpoint.step6.config-changed.pt")
    assert_same_state(kept["G"], finished["G"]) and kept["config"]["lr"] == 1e-3
    with pytest.warns(RuntimeWarning, match=r"past this run's last step \(step 6 > 3"):  # fewer epochs than trained
        pretrain(**pre_kw(data_dir, out, epochs=1, lr=2e-3))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert (out / "checkpoint.step6.past-end.pt").is_file() and (out / "checkpoint.step6.config-changed.pt").is_file()


def test_changed_training_data_is_not_resumed(data_dir, tmp_path):
    import shutil

    data2 = tmp_path / "data2"
    shutil.copytree(data_dir, data2)
    out = tmp_path / "run"
    pretrain(**pre_kw(data2, out, epochs=1))
    lr0 = np.load(data2 / "lr" / "img0.npy")
    np.save(data2 / "lr" / "img0.npy", 255 - lr0)
    with pytest.warns(RuntimeWarning, match="data_fingerprint"):
        pretrain(**pre_kw(data2, out, epochs=1))


def test_gan_rejects_mismatched_settings(data_dir, init_generator, tmp_path):
    with pytest.raises(ValueError, match="in_size"):
        train_gan(**gan_kw(data_dir, tmp_path / "a", init_generator, lr_patch=12))
    with pytest.raises(ValueError, match="differs from model.generator"):
        train_gan(**gan_kw(data_dir, tmp_path / "b", init_generator, gen_cfg={**TINY_G, "stem_width": 12}))
    with pytest.raises(ValueError, match="adv_loss"):
        train_gan(**gan_kw(data_dir, tmp_path / "c", init_generator, adv_loss="wgan"))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        train_gan(**gan_kw(data_dir, tmp_path / "d", tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------
# NaN / inf guard
# ---------------------------------------------------------------------------


def _nan_on_calls(fn, bad_calls):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        out = fn(*args, **kwargs)
        return out * float("nan") if calls["n"] in bad_calls else out

    return wrapped


def test_isolated_nan_steps_are_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    import srmap.train as train_mod

    monkeypatch.setattr(train_mod, "l1_loss", _nan_on_calls(train_mod.l1_loss, {2, 3}))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        pretrain(**pre_kw(data_dir, tmp_path, max_bad_steps=3))
    rows = read_csv(tmp_path / "losses.csv")
    assert [int(r["skipped"]) for r in rows] == [1, 1, 0]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["skipped_total"] == 2
    assert int(ckpt["optimizers"]["G"]["state"][0]["step"]) == 6 - 2  # no Adam update on skipped steps
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values())


def test_persistent_nan_stops_with_a_clear_error_and_keeps_the_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import srmap.train as train_mod

    monkeypatch.setattr(train_mod, "l1_loss", _nan_on_calls(train_mod.l1_loss, set(range(3, 100))))
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="max_bad_steps=2.*checkpoint"):
        pretrain(**pre_kw(data_dir, tmp_path, ckpt_every=2, max_bad_steps=2))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["G"].values())
    assert not (tmp_path / "generator.pt").exists()


def test_gan_skips_only_the_network_whose_update_is_bad(data_dir, init_generator, tmp_path, monkeypatch):
    import srmap.train as train_mod

    monkeypatch.setattr(train_mod, "critic_adv_loss", _nan_on_calls(train_mod.critic_adv_loss, {2}))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        train_gan(**gan_kw(data_dir, tmp_path, init_generator))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert int(ckpt["optimizers"]["G"]["state"][0]["step"]) == 4
    assert int(ckpt["optimizers"]["D"]["state"][0]["step"]) == 3
    assert [int(r["skipped"]) for r in read_csv(tmp_path / "losses.csv")] == [0, 1, 0, 0]


# ---------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------

WRITER = """
import sys, torch
from srmap.checkpoint import save_checkpoint
path = sys.argv[1]
blob = torch.randn(6_000_000)  # 24 MB: a write takes long enough to be interrupted
i = 0
while True:
    print(i, flush=True)
    save_checkpoint(path, {"i": i, "blob": blob})
    i += 1
"""


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # let two complete checkpoints land first
            if int(line) >= 2:
                break
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".checkpoint.pt.*")):  # a write is under way
            assert time.monotonic() < deadline, "the writer never started a third checkpoint"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".checkpoint.pt.*")), "the kill should have interrupted a write"
    state = load_checkpoint(path)
    assert state["i"] >= 1 and state["blob"].numel() == 6_000_000


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    torch.save({"step": 1, "evil": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*weights_only"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is live when unpickled unsafely
    assert marker.exists()


def test_save_checkpoint_round_trips_and_missing_file_is_named(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, {"step": 7, "w": torch.arange(3.0), "rng": (3, (1, 2), None)})
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["w"], torch.arange(3.0)) and state["rng"] == (3, (1, 2), None)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------
# What happens to a checkpoint (docs/training.md): resumed, kept aside or refused
# ---------------------------------------------------------------------------


def _signal_on_call(fn, n, signum):
    """``fn`` that sends this process ``signum`` during its ``n``-th call (mid-step, as SLURM would)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_pretrain_signal_before_the_first_checkpoint_then_resume_is_bit_identical(data_dir, tmp_path, monkeypatch,
                                                                                  signum):
    import srmap.train as train_mod
    from srmap.train import TrainingStopped

    full = pretrain(**pre_kw(data_dir, tmp_path / "full"))  # ckpt_every=100: no scheduled checkpoint before the end
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "l1_loss", _signal_on_call(train_mod.l1_loss, 2, signum))
        with pytest.raises(TrainingStopped) as stop:
            pretrain(**pre_kw(data_dir, out))
    assert stop.value.exit_code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after step 2 of 6" in str(stop.value)
    assert "run the stage again to resume" in str(stop.value) and "\n" not in str(stop.value)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2 and not (out / "generator.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the stop
    resumed = pretrain(**pre_kw(data_dir, out))
    assert json.loads((out / "training_options.json").read_text())["resumed_from_step"] == 2
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])
    assert (tmp_path / "full" / "losses.csv").read_text() == (out / "losses.csv").read_text()


def test_gan_sigusr1_then_resume_is_bit_identical(data_dir, init_generator, tmp_path, monkeypatch):
    import srmap.train as train_mod
    from srmap.train import TrainingStopped

    full = train_gan(**gan_kw(data_dir, tmp_path / "full", init_generator))
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "r1_penalty", _signal_on_call(train_mod.r1_penalty, 3, signal.SIGUSR1))
        with pytest.raises(TrainingStopped, match="SIGUSR1 after step 3 of 4"):
            train_gan(**gan_kw(data_dir, out, init_generator))
    resumed = train_gan(**gan_kw(data_dir, out, init_generator))
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    for key in ("G", "G_ema", "D"):
        assert_same_state(a[key], b[key])
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])


def test_code_changes_resume_and_are_recorded(data_dir, tmp_path, monkeypatch, capsys):
    import srmap.train as train_mod

    out = tmp_path / "run"
    pretrain(**pre_kw(data_dir, out), stop_after=3)
    monkeypatch.setattr(train_mod, "code_fingerprint", lambda: "e" * 64)  # a comment added to srmap/nets.py
    pretrain(**pre_kw(data_dir, out))
    assert "resuming" in capsys.readouterr().err and not list(out.glob("checkpoint.step*"))
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["resumed_from_step"] == 3 and opts["config"]["code_history"][0]["step"] == 3
    assert opts["config"]["code_history"][0]["code_sha256"] != "e" * 64 and opts["config"]["code_sha256"] == "e" * 64
    finished = load_checkpoint(out / "generator.pt")["state_dict"]
    # A finished run whose code changed (DVC re-runs the stage for any dependency): resumed at its last step,
    # nothing retrained, generator.pt written again from it, the second change recorded too.
    monkeypatch.setattr(train_mod, "code_fingerprint", lambda: "f" * 64)
    (out / "generator.pt").unlink()
    pretrain(**pre_kw(data_dir, out))
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["resumed_from_step"] == 6 and [h["code_sha256"] for h in opts["config"]["code_history"]][1] == "e" * 64
    assert_same_state(finished, load_checkpoint(out / "generator.pt")["state_dict"])
    assert not list(out.glob("checkpoint.step*"))


def test_a_forced_rerun_sets_the_finished_checkpoint_aside_untouched(data_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(**pre_kw(data_dir, out))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.warns(RuntimeWarning, match=r"finished run.*kept it as .*checkpoint\.step6\.rerun\.pt"):
        pretrain(**pre_kw(data_dir, out))
    assert (out / "checkpoint.step6.rerun.pt").read_bytes() == before
    with pytest.warns(RuntimeWarning, match=r"checkpoint\.step6\.rerun\.1\.pt"):  # a second one never replaces it
        pretrain(**pre_kw(data_dir, out))
    assert (out / "checkpoint.step6.rerun.pt").read_bytes() == before
    assert json.loads((out / "training_options.json").read_text())["set_aside"].endswith("rerun.1.pt")


def test_another_stages_checkpoint_is_set_aside(data_dir, init_generator, tmp_path):
    gan_out = tmp_path / "gan"
    train_gan(**gan_kw(data_dir, gan_out, init_generator), stop_after=1)
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((gan_out / "checkpoint.pt").read_bytes())
    with pytest.warns(RuntimeWarning, match=r"not a checkpoint of this stage.*checkpoint\.step1\.foreign\.pt"):
        pretrain(**pre_kw(data_dir, out, epochs=1))
    assert (out / "checkpoint.step1.foreign.pt").read_bytes() == (gan_out / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_refused_and_left_in_place(data_dir, tmp_path, damage):
    out = tmp_path / "run"
    pretrain(**pre_kw(data_dir, out), stop_after=2)
    good = (out / "checkpoint.pt").read_bytes()
    bad = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": os.urandom(4096)}[damage]
    (out / "checkpoint.pt").write_bytes(bad)
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError) as err:
        pretrain(**pre_kw(data_dir, out))
    assert str(out / "checkpoint.pt") in str(err.value) and "\n" not in str(err.value)
    assert (out / "checkpoint.pt").read_bytes() == bad and sorted(p.name for p in out.iterdir()) == listing


def test_slurm_durations_and_the_stop_margin():
    assert [parse_slurm_duration(t) for t in ("0:30", "59:58", "23:59:59", "1-00:00:00", "2-03:04:05")] == [
        30, 3598, 86399, 86400, 2 * 86400 + 3 * 3600 + 4 * 60 + 5]
    assert parse_slurm_duration("UNLIMITED") is None and parse_slurm_duration("INVALID") is None
    assert stop_deadline(None, {}) == (None, 600.0)
    deadline, margin = stop_deadline(7200.0, {})
    assert margin == 600.0 and deadline == pytest.approx(time.monotonic() + 6600, abs=5)
    assert stop_deadline(60.0, {"SRMAP_STOP_BEFORE_LIMIT": "600"})[1] == 30.0  # at most half of a short job
    with pytest.raises(ValueError, match=r"SRMAP_STOP_BEFORE_LIMIT='soon'.*seconds"):
        stop_deadline(60.0, {"SRMAP_STOP_BEFORE_LIMIT": "soon"})


def test_training_stops_itself_before_the_job_time_limit_and_resumes_bit_identically(data_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    import srmap.train as train_mod
    from srmap.train import TrainingStopped

    full = pretrain(**pre_kw(data_dir, tmp_path / "full"))
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "slurm_time_left", lambda: 0.0)  # squeue says the limit is now
        with pytest.raises(TrainingStopped, match=r"before the SLURM job's time limit after step 1 of 6") as stop:
            pretrain(**pre_kw(data_dir, out))
    assert stop.value.exit_code == 75 and load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert "SLURM job time limit in 0 s" in capsys.readouterr().err
    resumed = pretrain(**pre_kw(data_dir, out))
    assert_same_state(load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"])
