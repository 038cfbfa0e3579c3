"""The pilot behind the study and demo profiles' settings (docs/study.md), scored on TRAINING images only.

The held-out images (coffee, motorcycle_left) are never read: the pilot scores on
two of the study's training photographs (astronaut, rocket), so no choice it
guides was made by looking at held-out numbers. It trains at the study profile's
widths with the study's own options, shortened: L1 pretraining for --pretrain
steps, then each GAN run for --gan steps from that one L1 generator. Nothing is
logged to MLflow (library calls, no pipeline stage); every number goes to stdout.

    python experiments/study_pilot.py pretrain --steps 400
    python experiments/study_pilot.py noise 5 15 40              # the L1 generator with noise switched on, no GAN
    python experiments/study_pilot.py gan n10 --steps 300 noise_init=10 ema_beta=0.99 lr_d=0.0001
    python experiments/study_pilot.py --profile demo --work /tmp/demo-pilot pretrain --steps 1500 lr=0.001
    python experiments/study_pilot.py --profile demo --work /tmp/demo-pilot gan context --steps 400 \
        fidelity_context=true fidelity_border=0                      # a #22 option (docs/study.md)

A GAN run is scored as it is and projected onto its input (``+ projection``).

Runs about 5 min per 300 GAN steps on 2 CPU cores; outputs under --work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PILOT_IMAGES = ("astronaut", "rocket")  # training images of the study profile, scored in the pilot


def _data(work: Path, train: list[str]) -> tuple[Path, Path]:
    """Training patches of the study's images and the pilot's scoring pairs, made once under ``work``."""
    from srmap.prepare import degrade_split, fetch_skimage

    train_dir, score_dir = work / "prepared" / "train", work / "prepared" / "score"
    if not (train_dir / "manifest.json").is_file():
        fetch_skimage(train, work / "hr" / "train")
        degrade_split(work / "hr" / "train", train_dir, fmt="npy", max_pixels=40_000_000, progress=False)
    if not (score_dir / "manifest.json").is_file():
        fetch_skimage(PILOT_IMAGES, work / "hr" / "score")
        degrade_split(work / "hr" / "score", score_dir, fmt="png", max_pixels=40_000_000, progress=False)
    return train_dir, score_dir


def _score(methods, score_dir: Path, out: Path, tag: str) -> None:
    """NTIRE 2021 scores (pretrained LPIPS) of ``methods`` on the pilot images, one line each."""
    from srmap.evaluate import evaluate_stage

    metrics, _ = evaluate_stage(valid_dir=score_dir, methods=methods, out_dir=out, noise_scale=1.0, crop_border=4,
                                lpips_pretrained=True, tile=0, tile_pad=16)
    for slug, m in metrics.items():
        print(f"{tag} {slug}: LPIPS {m['lpips']:.4f} LR-PSNR {m['lr_psnr']:.2f} (2-px LR shave "
              f"{m['lr_psnr_inner']:.2f}) diversity {m['diversity']:.2f} PSNR {m['psnr']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("pretrain", "noise", "gan"))
    ap.add_argument("args", nargs="*", help="noise: scales (0-255 units); pretrain: key=value overrides of its "
                                            "options; gan: a run name, then key=value overrides of train_gan options")
    ap.add_argument("--steps", type=int, default=300, help="training steps (pretrain, gan)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/srmap-study-pilot"), help="output folder")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default="study", help="profile whose networks and options are piloted [study]")
    a = ap.parse_intermixed_args()  # key=value overrides may follow --steps

    from srmap.checkpoint import save_generator
    from srmap.config import load_params
    from srmap.evaluate import Method
    from srmap.checkpoint import load_generator
    from srmap.options import CriticConfig, GeneratorConfig
    from srmap.options import PROJECTED, GanOptions, PretrainOptions
    from srmap.train import pretrain, train_gan

    _, p = load_params(a.params, a.profile)
    train_dir, score_dir = _data(a.work, p["data"]["train"])
    gen_cfg = GeneratorConfig(**p["model"]["generator"])
    l1 = a.work / "pretrain" / "generator.pt"
    short = dict(epochs=1, iters_per_epoch=a.steps, milestones=[1], ckpt_every=a.steps, log_every=50)
    t0 = time.time()
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.args[1 if a.what == "gan" else 0:])
                 if a.what != "noise"}
    if a.what == "pretrain":
        pretrain(PretrainOptions(**{**p["pretrain"], **short, **overrides}), data_dir=train_dir, out_dir=l1.parent,
                 gen_cfg=gen_cfg)
        print(f"pretrain: {a.steps} steps in {time.time() - t0:.0f} s, overrides {overrides}")
        _score([Method("bicubic", "Bicubic"), Method("l1", "L1", l1)], score_dir, a.work / "eval_pretrain",
               "pretrain")
    elif a.what == "noise":
        methods = [Method("l1", "L1", l1)]
        for value in a.args:
            G = load_generator(l1)
            G.set_noise_scales(float(value))
            path = a.work / "noise" / f"noise_{value}.pt"
            save_generator(path, G, gen_cfg, {"noise_scales": float(value)})
            methods.append(Method(f"noise_{value.replace('.', '_')}", value, path, samples=10))
        _score(methods, score_dir, a.work / "eval_noise", "noise")
    else:
        if not a.args:
            ap.error("gan: give a run name")
        name = a.args[0]
        opts = {**p["train_gan"], **short, "image_every": a.steps, **overrides}
        out = a.work / f"gan_{name}"
        train_gan(GanOptions(**opts), data_dir=train_dir, out_dir=out, init_generator=l1, gen_cfg=gen_cfg,
                  critic_cfg=CriticConfig(**p["model"]["critic"]))
        print(f"gan {name}: {a.steps} steps in {time.time() - t0:.0f} s, overrides {overrides}")
        print(f"gan {name}: noise scales {load_generator(out / 'generator.pt').noise_scale_means()}")
        rows = (("l1", "L1", l1, 1), ("srmap", name, out / "generator.pt", 10))
        _score([Method(slug + suffix, label + tag, path, samples=n, consistency=mode)
                for mode, (suffix, tag) in (("none", ("", "")), ("project", PROJECTED))
                for slug, label, path, n in rows], score_dir, a.work / f"eval_gan_{name}", f"gan {name}")


if __name__ == "__main__":
    main()
