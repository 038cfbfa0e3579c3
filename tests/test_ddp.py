"""DistributedDataParallel on CPU: `torchrun --nproc_per_node=2` (gloo) against one process on the same global batch.

Training noise is a pure function of (run seed, the sample's global index)
(srmap.noise), so two ranks together draw exactly the noise one process
draws: the test records the noise keys of every generator call on every rank
and checks that their union is the single process's. The comparison runs
with the noise on in both stages (the GAN stage sets every scale to 5 first)
and with the R1 penalty on. Both stages run in one torchrun call. Every rank
also records a digest of its G and EMA weights after each EMA update: DDP must
keep them bit-identical across ranks.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_prepared
from srmap.checkpoint import load_checkpoint, save_generator
from srmap.nets import Generator
from srmap.options import GeneratorConfig
from srmap.options import GanOptions, PretrainOptions
import srmap.train as T
from srmap.train import pretrain, train_gan

ROOT = Path(__file__).resolve().parents[1]
TINY_G = {"stem_width": 8, "feature_widths": [8, 8, 8], "blocks_per_stage": [1], "compression": 4,
          "kernel_size": 3}
TINY_C = {"basis_size": 2, "stage_widths": [4, 8, 8, 8], "blocks_per_stage": [1, 1, 1, 1], "epilog_width": 8,
          "latent_width": 8, "compression": 4, "kernel_size": 3}  # 32 px input
COMMON = dict(batch_size=4, lr_patch=8, betas=[0.5, 0.99], epochs=1, iters_per_epoch=3, milestones=[], lr_gamma=0.5,
              ckpt_every=100, log_every=1, workers=0, max_bad_steps=3, amp=False, channels_last=True, compile=False)
# float32: under bf16 the critic margins move with the per-rank batch shapes (tests/test_cuda_options.py covers amp)

WORKER = """
import faulthandler, hashlib, json, os, sys
faulthandler.dump_traceback_later(150, exit=True)  # a hung collective shows its stack instead of a bare timeout
import srmap.train as T
from srmap.options import GanOptions, PretrainOptions
digests = []
ema_update = T.ema_update

def recording_ema_update(ema, model, beta):
    ema_update(ema, model, beta)
    digests.append({name: hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes()
                                                   for t in net.state_dict().values())).hexdigest()
                    for name, net in (("G", model), ("G_ema", ema))})

T.ema_update = recording_ema_update
noise_keys, training_keys = [], T.training_keys

def recording_training_keys(seed, indices):
    noise_keys.append(indices.tolist())
    return training_keys(seed, indices)

T.training_keys = recording_training_keys
args = json.loads(open(sys.argv[1]).read())
T.pretrain(PretrainOptions(**args["pretrain"]["opts"]), **args["pretrain"]["run"])
T.train_gan(GanOptions(**args["train_gan"]["opts"]), **args["train_gan"]["run"])
with open(sys.argv[2] + "." + os.environ["RANK"], "w") as f:
    json.dump({"digests": digests, "noise_keys": noise_keys}, f)
"""


def stage_kwargs(data: Path, out: Path, init: Path) -> dict:
    """Per stage: the options (JSON-able) and the run's paths, configs and device."""
    return {
        "pretrain": {"opts": dict(COMMON, seed=0, lr=1e-3, noise=True),
                     "run": dict(data_dir=str(data), out_dir=str(out / "pretrain"), gen_cfg=TINY_G, device="cpu")},
        "train_gan": {"opts": dict(COMMON, seed=1, lr_g=1e-3, lr_d=1e-3, alpha=2550.0, r1_gamma=1e-3,
                                   adv_loss="softplus", image_every=2, ema_beta=0.9, noise_init=5.0,
                                   fidelity_border=2, fidelity_clamp=False, fidelity_context=False, consistency="none"),
                      "run": dict(data_dir=str(data), out_dir=str(out / "gan"), init_generator=str(init),
                                  gen_cfg=TINY_G, critic_cfg=TINY_C, device="cpu")},
    }


def losses(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


@pytest.mark.timeout(300)
def test_two_process_ddp_matches_single_process(tmp_path, monkeypatch):
    data = make_prepared(tmp_path / "data")
    torch.manual_seed(3)
    cfg = GeneratorConfig(**TINY_G)
    init = tmp_path / "init.pt"
    save_generator(init, Generator(cfg), cfg, {"stage": "test"})

    ddp_args = stage_kwargs(data, tmp_path / "ddp", init)
    (tmp_path / "args.json").write_text(json.dumps(ddp_args))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "args.json"), str(tmp_path / "digests")],
                          env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # G and its EMA are bit-identical on both ranks after every step (3 GAN steps).
    records = [json.loads((tmp_path / f"digests.{r}").read_text()) for r in (0, 1)]
    ranks = [r["digests"] for r in records]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]
    assert ranks[0][0]["G"] != ranks[0][1]["G"] and ranks[0][0]["G_ema"] != ranks[0][1]["G_ema"]  # they do move

    single = stage_kwargs(data, tmp_path / "single", init)
    single_keys, training_keys = [], T.training_keys

    def recording(seed, indices):
        single_keys.append(indices.tolist())
        return training_keys(seed, indices)

    monkeypatch.setattr(T, "training_keys", recording)
    pretrain(PretrainOptions(**single["pretrain"]["opts"]), **single["pretrain"]["run"])
    train_gan(GanOptions(**single["train_gan"]["opts"]), **single["train_gan"]["run"])
    # 3 pretraining calls, then 2 per GAN step (critic half, G half): the ranks' keys together are one process's
    assert len(single_keys) == 3 + 2 * 3 == len(records[0]["noise_keys"]) == len(records[1]["noise_keys"])
    for one, r0, r1 in zip(single_keys, records[0]["noise_keys"], records[1]["noise_keys"]):
        assert sorted(r0 + r1) == sorted(one) and not set(r0) & set(r1)

    for stage, keys in (("pretrain", ["l1"]), ("gan", ["fidelity", "generator", "critic", "r1"])):
        d, s = losses(tmp_path / "ddp" / stage / "losses.csv"), losses(tmp_path / "single" / stage / "losses.csv")
        assert list(d["step"]) == list(s["step"]) == [1, 2, 3]
        for k in keys:
            np.testing.assert_allclose(d[k], s[k], rtol=1e-4, err_msg=f"{stage} {k}")
        ckpt = load_checkpoint(tmp_path / "ddp" / stage / "checkpoint.pt")
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
        opts = json.loads((tmp_path / "ddp" / stage / "training_options.json").read_text())
        assert opts["world_size"] == 2

    for stage in ("pretrain", "gan"):
        d = load_checkpoint(tmp_path / "ddp" / stage / "generator.pt")["state_dict"]
        s = load_checkpoint(tmp_path / "single" / stage / "generator.pt")["state_dict"]
        for k in d:  # noise scales included: both runs drew the same noise
            torch.testing.assert_close(d[k], s[k], rtol=0, atol=1e-5, msg=f"{stage} weight {k}")
    d, s = (load_checkpoint(tmp_path / run / "gan" / "checkpoint.pt")["D"] for run in ("ddp", "single"))
    for k in d:
        torch.testing.assert_close(d[k], s[k], rtol=0, atol=1e-5, msg=f"critic weight {k}")
    # Rank 0 alone wrote the monitoring grids.
    assert sorted(p.name for p in (tmp_path / "ddp" / "gan" / "monitor").iterdir()) == ["step_00000002.png",
                                                                                         "step_00000003.png"]


WORKER_STOP = """
import json, os, signal, sys
import srmap.train as T
from srmap.options import PretrainOptions
calls = {"n": 0}
l1_loss = T.l1_loss

def l1_then_signal(*args, **kwargs):  # rank 1 alone gets SIGUSR1 during its second step
    calls["n"] += 1
    if calls["n"] == 2 and os.environ["RANK"] == "1" and os.environ.get("SEND_SIGNAL"):
        os.kill(os.getpid(), signal.SIGUSR1)
    return l1_loss(*args, **kwargs)

T.l1_loss = l1_then_signal
args = json.loads(open(sys.argv[1]).read())
try:
    T.pretrain(PretrainOptions(**args["pretrain"]["opts"]), **args["pretrain"]["run"])
    result = {"stopped": None}
except T.TrainingStopped as exc:
    result = {"stopped": str(exc), "exit_code": exc.exit_code}
with open(sys.argv[2] + "." + os.environ["RANK"], "w") as f:
    json.dump(result, f)
"""


@pytest.mark.timeout(300)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    data = make_prepared(tmp_path / "data")
    args = stage_kwargs(data, tmp_path / "ddp", tmp_path / "unused.pt")
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "worker.py").write_text(WORKER_STOP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), str(tmp_path / "args.json"), str(tmp_path / "result")]
    proc = subprocess.run(cmd, env={**env, "SEND_SIGNAL": "1"}, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]
    for r in results:  # rank 0 never saw the signal, yet stops with rank 1 after the same step
        assert "stopped by SIGUSR1 after step 2 of 3" in r["stopped"] and r["exit_code"] == 138, results
    out = tmp_path / "ddp" / "pretrain"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # rank 0 wrote both ranks' state
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint.pt"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)  # the next job resumes
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "result.0").read_text())["stopped"] is None
    assert json.loads((out / "training_options.json").read_text())["resumed_from_step"] == 2
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3 and (out / "generator.pt").is_file()
