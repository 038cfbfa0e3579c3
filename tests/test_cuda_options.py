"""The CUDA options on CPU: bf16 autocast, channels_last and torch.compile (inductor) in both training stages.

Each option runs a few steps of a tiny network and is compared with the float32
eager run of the same steps (srmap.train.device_options applies every flag on
CPU as on CUDA). Tolerances:

* channels_last and compile change only the order of float32 sums: losses
  within 1e-4 relative.
* bf16 autocast rounds every convolution input to 8 mantissa bits (relative
  step 2**-8 = 0.4 %). L1, fidelity and R1 stay within 5 % relative of float32
  over three steps. The relativistic terms are softplus (slope <= 1) of the
  difference of two critic scores; this critic's scores are ~10 and come out of
  bf16 up to ~5 % off (0.5 each, checked below), so those terms get an absolute
  tolerance of 1.0 rather than a relative one.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_prepared
from srmap.checkpoint import save_generator
from srmap.losses import critic_adv_loss, r1_penalty
from srmap.nets import Critic, Generator, critic_config, generator_config
from srmap.options import GanOptions, PretrainOptions
from srmap.train import device_options, pretrain, train_gan

TINY_G = {"stem_width": 8, "feature_widths": [8, 8, 8], "blocks_per_stage": [1], "compression": 4,
          "kernel_size": 3}
TINY_C = {"basis_size": 2, "stage_widths": [4, 8, 8, 8], "blocks_per_stage": [1, 1, 1, 1], "epilog_width": 8,
          "latent_width": 8, "compression": 4, "kernel_size": 3}  # 32 px input
COMMON = dict(batch_size=4, lr_patch=8, betas=[0.5, 0.99], epochs=1, iters_per_epoch=3, milestones=[], lr_gamma=0.5,
              ckpt_every=100, log_every=1, workers=0, max_bad_steps=3)
FP32 = dict(amp=False, channels_last=False, compile=False)
OPTIONS = {"amp": (dict(FP32, amp=True), 5e-2), "channels_last": (dict(FP32, channels_last=True), 1e-4),
           "compile": (dict(FP32, compile=True), 1e-4)}


def losses(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_options")
    data = make_prepared(root / "data")
    torch.manual_seed(3)
    cfg = generator_config(TINY_G)
    G = Generator(cfg)
    G.set_noise_scales(5.0)  # noise on, so its path runs under every option
    init = root / "init.pt"
    save_generator(init, G, cfg, {"stage": "test"})
    return root, data, init


def run_stage(stage: str, root: Path, data: Path, init: Path, name: str, flags: dict) -> Path:
    out = root / name / stage
    if stage == "pretrain":
        pretrain(PretrainOptions(**COMMON, **flags, seed=0, lr=1e-3, noise=True), data_dir=data, out_dir=out,
                 gen_cfg=TINY_G, device="cpu")
    else:
        train_gan(GanOptions(**COMMON, **flags, seed=1, lr_g=1e-3, lr_d=1e-3, alpha=2550.0, r1_gamma=1e-3,
                             adv_loss="softplus", image_every=100, ema_beta=0.9, noise_init=None),
                  data_dir=data, out_dir=out, init_generator=init, gen_cfg=TINY_G, critic_cfg=TINY_C, device="cpu")
    return out


KEYS = {"pretrain": ["l1"], "train_gan": ["fidelity", "generator", "critic", "r1"]}
ADVERSARIAL = ("generator", "critic")


CASES = [(stage, option) for stage in ("pretrain", "train_gan") for option in ("amp", "channels_last")]
# compile: the GAN stage only (it compiles the same G as pretraining, with the per-sample noise streams);
# inductor's first C++ builds take about a minute on the 2-core CI machine.
CASES.append(pytest.param("train_gan", "compile", marks=[pytest.mark.slow, pytest.mark.timeout(600)]))


@pytest.mark.parametrize("stage,option", CASES)
def test_option_matches_fp32_eager(setup, stage, option, capfd):
    root, data, init = setup
    base = root / "fp32" / stage
    if not (base / "losses.csv").is_file():
        run_stage(stage, root, data, init, "fp32", FP32)
    flags, rtol = OPTIONS[option]
    out = run_stage(stage, root, data, init, option, flags)
    # The stage log and training_options.json say which options are in effect.
    err = capfd.readouterr().err
    on = {k: ("on" if v else "off") for k, v in flags.items()}
    assert (f"{stage}: device cpu: bf16 autocast {on['amp']}, channels_last {on['channels_last']}, "
            f"torch.compile {on['compile']}") in err
    assert json.loads((out / "training_options.json").read_text())["in_effect"] == flags
    got, ref = losses(out / "losses.csv"), losses(base / "losses.csv")
    assert list(got["step"]) == [1, 2, 3]
    for k in KEYS[stage]:
        assert np.isfinite(got[k]).all(), f"{option} {stage} {k}: {got[k]}"
        if option == "amp" and k in ADVERSARIAL:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1.0, err_msg=f"{option} {stage} {k}")
        else:
            np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=1e-6, err_msg=f"{option} {stage} {k}")
    assert (got["skipped"] == 0).all()


def test_critic_head_and_r1_stay_float32_under_cpu_autocast():
    torch.manual_seed(0)
    D = Critic(critic_config(TINY_C)).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref = D(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = D.fc_act(D.fc(D.reduce(D.reduce_act(torch.randn(2, 8, 2, 2))).flatten(1)))
        scores = D(x)
        fake = D(torch.rand(2, 3, 32, 32))
    assert h.dtype == torch.bfloat16  # autocast is really on for the layers before the head
    assert scores.dtype == torch.float32 and fake.dtype == torch.float32
    torch.testing.assert_close(scores.detach(), ref, rtol=0.05, atol=0.0)  # the bf16 score error quoted above
    r1 = r1_penalty(scores, x)
    loss = critic_adv_loss(scores, fake) + r1
    assert r1.dtype == torch.float32 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_device_options_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert device_options(cpu, amp=True, channels_last=True, compile=False).describe() == \
        "device cpu: bf16 autocast on, channels_last on, torch.compile off"
    with pytest.raises(ValueError, match="amp: expected true or false"):
        device_options(cpu, amp="yes", channels_last=True, compile=False)
    with pytest.raises(ValueError, match="amp: bf16 autocast runs on cuda and cpu"):
        device_options(torch.device("meta"), amp=True, channels_last=False, compile=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="compile: torch.compile on CPU needs a C.. compiler"):
        device_options(cpu, amp=False, channels_last=False, compile=True)
