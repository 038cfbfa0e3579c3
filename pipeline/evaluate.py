"""Stage `evaluate`: score the L1 generator and SRMAP with the NTIRE 2021 protocol.

Reads params `<profile>.evaluate`; reads `data/<profile>/prepared/valid` and
both generators. Writes `results/<profile>/eval/` (SR images, per-image CSVs
and methods.json: labels and the LPIPS weight source) and the DVC metrics
file `results/<profile>/metrics.json` ({method slug: {metric: number}}); logs
the same numbers to MLflow as `<slug>/<metric>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir, atomic_write_json  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.evaluate import Method, evaluate_stage, log_scores
    from srmap.options import PROJECTED
    from srmap.tracking import Tracker

    section = ctx.params["evaluate"]
    # Table 2's rows of our own models, in order (Bicubic and published models: the baselines stage), once per
    # evaluate.consistency item: as they are ("none"), and projected onto the consistent images ("project").
    methods = []
    for mode in section["consistency"]:
        slug, label = ("", "") if mode == "none" else PROJECTED
        methods += [Method(f"l1{slug}", f"Generator w/ L1{label} (ours)", ctx.paths.pretrain / "generator.pt",
                           consistency=mode),
                    Method(f"srmap{slug}", f"SRMAP{label} (ours)", ctx.paths.train_gan / "generator.pt",
                           samples=section["samples"], consistency=mode)]
    with Tracker(ctx.root, stage="evaluate", profile=ctx.profile, params={"evaluate": section},
                 pipeline_params=ctx.params) as tracker:
        with atomic_dir(ctx.paths.results / "eval") as tmp:
            metrics, info = evaluate_stage(valid_dir=ctx.paths.prepared / "valid", methods=methods, out_dir=tmp,
                                           noise_scale=section["noise_scale"], crop_border=section["crop_border"],
                                           lpips_pretrained=section["lpips_pretrained"], tile=section["tile"],
                                           tile_pad=section["tile_pad"])
        atomic_write_json(ctx.paths.results / "metrics.json", metrics)
        log_scores(tracker, metrics, info["lpips"]["weights"], ctx.paths.results / "metrics.json")
        tracker.log_artifact(ctx.paths.results / "eval" / "methods.json")
    print(f"evaluate: metrics in {ctx.paths.results / 'metrics.json'} (LPIPS weights: {info['lpips']['weights']})")


if __name__ == "__main__":
    stage_main("evaluate", main)
