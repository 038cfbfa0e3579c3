"""Stage `pretrain`: L1 pretraining of the noise-injected generator.

Reads params `<profile>.model.generator` and `<profile>.pretrain`; reads
`data/<profile>/prepared/train`. Writes `models/<profile>/pretrain/`:
generator.pt, checkpoint.pt (resume state, kept by DVC), losses.csv (DVC plot)
and training_options.json. Runs under `torchrun` for several GPUs; resumes
automatically from checkpoint.pt. Logs one MLflow run (rank 0 only).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.options import GeneratorConfig, PretrainOptions
    from srmap.tracking import Tracker
    from srmap.train import pretrain

    section = ctx.params["pretrain"]
    model = ctx.params["model"]["generator"]
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with Tracker(ctx.root, stage="pretrain", profile=ctx.profile, enabled=rank0,
                 params={"pretrain": section, "model": {"generator": model}}, pipeline_params=ctx.params) as tracker:
        tracker.log_dataset(ctx.paths.prepared / "train", name=f"{ctx.profile}-train")
        out = pretrain(PretrainOptions(**section), data_dir=ctx.paths.prepared / "train", out_dir=ctx.paths.pretrain,
                       gen_cfg=GeneratorConfig(**model), tracker=tracker)
    if rank0:
        print(f"pretrain: generator in {out}")


if __name__ == "__main__":
    stage_main("pretrain", main)
