"""The CUDA options on CPU: bf16 autocast, channels_last and torch.compile (inductor) in both training stages.

Each option runs a few steps of a tiny network and is compared with the float32
eager run of the same steps (srmap.train.device_options applies every flag on
CPU as on CUDA). Tolerances:

* channels_last and compile change only the order of float32 sums: losses
  within 1e-4 relative.
* bf16 autocast rounds every convolution input to 8 mantissa bits (relative
  step 2**-8 = 0.4 %). A freshly initialised critic scores these 0-255 inputs at
  ~10, and bf16 moves such scores by up to ~5 % (checked below), which would
  move softplus terms near 0.69 by up to 1. So the GAN runs here scale the
  critic's head by 0.05 at construction (scores ~0.5, as a trained critic's
  differences are): the relativistic terms must then stay within 0.05 of
  float32 (measured: 0.014), fidelity within 5 % relative, and R1, a squared
  gradient norm that bf16 perturbs more, within 20 % (measured: 13 %).
* Every option must also change something: bf16 changes the trained weights'
  bits, channels_last reaches the batches the networks see.
"""

import csv
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import make_prepared
from srmap.checkpoint import save_generator
from srmap.losses import critic_adv_loss, r1_penalty
from srmap.nets import Critic, Generator
from srmap.options import CriticConfig, GeneratorConfig
from srmap.options import GanOptions, PretrainOptions
import srmap.train
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
    cfg = GeneratorConfig(**TINY_G)
    G = Generator(cfg)
    G.set_noise_scales(5.0)  # noise on, so its path runs under every option
    init = root / "init.pt"
    save_generator(init, G, cfg, {"stage": "test"})
    return root, data, init


def small_head_critic(cfg):
    """The stage's Critic with its head scaled by 0.05 (scores ~0.5; module docstring)."""
    D = Critic(cfg)
    with torch.no_grad():
        D.head.weight.mul_(0.05)
    return D


def run_stage(stage: str, root: Path, data: Path, init: Path, name: str, flags: dict) -> Path:
    out = root / name / stage
    seen = []  # whether each batch the stage converts is channels_last
    to_float = srmap.train.to_float

    def recording(x, device, channels_last):
        t = to_float(x, device, channels_last)
        seen.append(t.dim() == 4 and t.shape[1] == 3 and t.is_contiguous(memory_format=torch.channels_last))
        return t

    with mock.patch.object(srmap.train, "to_float", recording), \
            mock.patch.object(srmap.train, "Critic", small_head_critic):
        _run(stage, data, init, out, flags)
    (out / "channels_last.json").write_text(json.dumps(seen))
    return out


def _run(stage: str, data: Path, init: Path, out: Path, flags: dict) -> None:
    if stage == "pretrain":
        pretrain(PretrainOptions(**COMMON, **flags, seed=0, lr=1e-3, noise=True), data_dir=data, out_dir=out,
                 gen_cfg=TINY_G, device="cpu")
    else:
        train_gan(GanOptions(**COMMON, **flags, seed=1, lr_g=1e-3, lr_d=1e-3, alpha=2550.0, r1_gamma=1e-3,
                             adv_loss="softplus", image_every=100, ema_beta=0.9, noise_init=None,
                             fidelity_border=2, fidelity_clamp=False, fidelity_context=False, consistency="none"),
                  data_dir=data, out_dir=out, init_generator=init, gen_cfg=TINY_G, critic_cfg=TINY_C, device="cpu")


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
    in_effect = json.loads((out / "training_options.json").read_text())["in_effect"]
    assert {k: in_effect[k] for k in flags} == flags
    assert in_effect["flush_denormals_threads"] >= 1  # CPU: subnormals flushed (x86 CI and workstations)
    got, ref = losses(out / "losses.csv"), losses(base / "losses.csv")
    assert list(got["step"]) == [1, 2, 3]
    for k in KEYS[stage]:
        assert np.isfinite(got[k]).all(), f"{option} {stage} {k}: {got[k]}"
        if option == "amp" and k in ADVERSARIAL:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=0.05, err_msg=f"{option} {stage} {k}")
        elif option == "amp" and k == "r1":
            np.testing.assert_allclose(got[k], ref[k], rtol=0.2, atol=0, err_msg=f"{option} {stage} {k}")
        else:
            np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=1e-6, err_msg=f"{option} {stage} {k}")
    assert (got["skipped"] == 0).all()
    batches = json.loads((out / "channels_last.json").read_text())
    assert batches and all(batches) == (option == "channels_last")  # the flag reaches every batch
    if option == "amp":  # bf16 really ran: the trained weights differ in their bits, and only a little
        w_got, w_ref = (torch.load(d / "checkpoint.pt", weights_only=False)["G"] for d in (out, base))
        diffs = [(w_got[k].float() - w_ref[k].float()).abs().max().item() for k in w_ref]
        assert max(diffs) > 0 and max(diffs) < 1e-2, max(diffs)


def test_critic_head_and_r1_stay_float32_under_cpu_autocast():
    torch.manual_seed(0)
    D = Critic(CriticConfig(**TINY_C)).to(memory_format=torch.channels_last)
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
