"""Stage `train_gan`: MAP-GAN training (fidelity + relativistic adversarial, R1 critic).

Reads params `<profile>.model` and `<profile>.train_gan`; reads
`data/<profile>/prepared/train` and `models/<profile>/pretrain/generator.pt`.
Writes `models/<profile>/train_gan/`: generator.pt, checkpoint.pt (resume
state, kept by DVC), losses.csv (DVC plot), monitor/ image grids and
training_options.json. Runs under `torchrun` for several GPUs; resumes
automatically. Logs one MLflow run (rank 0 only).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.options import CriticConfig, GanOptions, GeneratorConfig
    from srmap.tracking import Tracker
    from srmap.train import train_gan

    section = ctx.params["train_gan"]
    model = ctx.params["model"]
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with Tracker(ctx.root, stage="train_gan", profile=ctx.profile, enabled=rank0,
                 params={"train_gan": section, "model": model}, pipeline_params=ctx.params) as tracker:
        tracker.log_dataset(ctx.paths.prepared / "train", name=f"{ctx.profile}-train")
        out = train_gan(GanOptions(**section), data_dir=ctx.paths.prepared / "train", out_dir=ctx.paths.train_gan,
                        init_generator=ctx.paths.pretrain / "generator.pt",
                        gen_cfg=GeneratorConfig(**model["generator"]), critic_cfg=CriticConfig(**model["critic"]),
                        tracker=tracker)
    if rank0:
        print(f"train_gan: generator in {out}")


if __name__ == "__main__":
    stage_main("train_gan", main)
