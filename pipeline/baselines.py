"""Stage `baselines`: measure Bicubic and the published models of Table 2 under the same protocol as SRMAP.

Reads params `<profile>.baselines` (which rows), `<profile>.evaluate.consistency` (a
projected Bicubic row) and `<profile>.evaluate.crop_border` / `lpips_pretrained` (the
same scoring as `evaluate`); reads the validation pairs in
`data/<profile>/prepared/valid`. The official RRDB/ESRGAN weights are fetched into
`models/baselines/` (SHA-256 verified; offline: put them there by hand). Writes
`results/<profile>/baselines/eval/` (SR images, per-image CSVs, methods.json) and the
DVC metrics file `results/<profile>/baselines/metrics.json` ({slug: {metric: number}});
logs the same numbers to MLflow as `<slug>/<metric>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's srmap, even without pip install
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir, atomic_write_json  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.baselines import baseline_methods
    from srmap.evaluate import evaluate_stage, log_scores
    from srmap.tracking import Tracker

    section, scoring = ctx.params["baselines"], ctx.params["evaluate"]
    valid = ctx.paths.prepared / "valid"
    methods = baseline_methods(section, root=ctx.root, models_dir=ctx.root / "models/baselines",
                               gt_stems=sorted(p.stem for p in (valid / "hr").glob("*.png")),
                               consistency=scoring["consistency"])
    with Tracker(ctx.root, stage="baselines", profile=ctx.profile,
                 params={"baselines": section, "evaluate": scoring}, pipeline_params=ctx.params) as tracker:
        with atomic_dir(ctx.paths.baselines / "eval") as tmp:
            metrics, info = evaluate_stage(valid_dir=valid, methods=methods, out_dir=tmp, noise_scale=0.0,
                                           crop_border=scoring["crop_border"],
                                           lpips_pretrained=scoring["lpips_pretrained"], tile=section["tile"],
                                           tile_pad=section["tile_pad"])
        atomic_write_json(ctx.paths.baselines / "metrics.json", metrics)
        log_scores(tracker, metrics, info["lpips"]["weights"], ctx.paths.baselines / "metrics.json")
    rows = ", ".join(m["label"] for m in info["methods"])
    print(f"baselines: {rows} scored; metrics in {ctx.paths.baselines / 'metrics.json'}")


if __name__ == "__main__":
    stage_main("baselines", main)
