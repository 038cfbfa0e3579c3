"""torch.compile of the training step: one graph, no graph breaks, no recompilation after the first step.

``torch._dynamo.explain`` traces without generating code, so these run in
seconds on CPU; the real loop runs with the ``aot_eager`` backend (dynamo and
AOTAutograd, forward and backward, without inductor's C++ build).
tests/test_cuda_options.py checks the numbers of an inductor-compiled run.
"""

from __future__ import annotations

import pytest
import torch

import srmap.train as T
from conftest import make_prepared
from srmap.checkpoint import save_generator
from srmap.losses import l1_loss
from srmap.nets import Critic, Generator
from srmap.noise import training_keys
from srmap.options import CriticConfig, GanOptions, GeneratorConfig

DEMO_G = GeneratorConfig(stem_width=32, feature_widths=(48, 32, 16), blocks_per_stage=(2, 2))
DEMO_D = CriticConfig(basis_size=3, stage_widths=(16, 32, 32, 48, 64), blocks_per_stage=(1, 1, 1, 1, 1),
                      epilog_width=64, latent_width=32)
TINY_G = {"stem_width": 8, "feature_widths": [8, 8, 8], "blocks_per_stage": [1], "compression": 4, "kernel_size": 3}
TINY_C = {"basis_size": 2, "stage_widths": [4, 8, 8, 8], "blocks_per_stage": [1, 1, 1, 1], "epilog_width": 8,
          "latent_width": 8, "compression": 4, "kernel_size": 3}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_demo_generator_step_with_noise_is_one_graph():
    G = Generator(DEMO_G).to(memory_format=torch.channels_last)
    G.set_noise_scales(5.0)  # noise on at all 20 injectors
    y = torch.rand(8, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 96, 96)

    def step(y, x, keys):  # the pretraining step's forward and loss (the loop compiles G; losses run eagerly)
        return l1_loss(G(y, seed=keys), x)

    ex = torch._dynamo.explain(step)(y, x, training_keys(0, torch.arange(8)))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(r.reason) for r in ex.break_reasons]


def test_demo_critic_is_one_graph():
    D = Critic(DEMO_D).to(memory_format=torch.channels_last)
    ex = torch._dynamo.explain(lambda x: D(x).mean())(torch.rand(4, 3, 96, 96))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(r.reason) for r in ex.break_reasons]


class RecompileTrap:
    """A tracker that, once step 1 is logged, makes any further dynamo recompilation an error."""

    def log_metrics(self, metrics, step):
        if step == 1:
            torch._dynamo.config.error_on_recompile = True

    def log_artifact(self, path, artifact_path=None):
        pass


@pytest.mark.timeout(300)
def test_compiled_gan_loop_does_not_recompile_after_its_first_step(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    data = make_prepared(tmp_path / "data")
    cfg = GeneratorConfig(**TINY_G)
    init = tmp_path / "init.pt"
    save_generator(init, Generator(cfg), cfg, {})
    monkeypatch.setattr(T, "_compiled", lambda m, c: torch.compile(m, backend="aot_eager", dynamic=False) if c else m)
    opts = GanOptions(seed=1, batch_size=4, lr_patch=8, lr_g=1e-3, lr_d=1e-3, betas=(0.0, 0.99), alpha=2550.0,
                      r1_gamma=1e-3, adv_loss="softplus", ema_beta=0.9, noise_init=5.0, fidelity_border=2,
                      fidelity_clamp=False, fidelity_context=False, consistency="none", epochs=1, iters_per_epoch=4,
                      milestones=(),
                      lr_gamma=0.5, image_every=100, ckpt_every=100, log_every=1, workers=0, max_bad_steps=3,
                      amp=False, channels_last=True, compile=True)
    counters.clear()
    T.train_gan(opts, data_dir=data, out_dir=tmp_path / "gan", init_generator=init, gen_cfg=TINY_G,
                critic_cfg=TINY_C, device="cpu", tracker=RecompileTrap())  # raises on a recompilation
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # G and the critic did compile
