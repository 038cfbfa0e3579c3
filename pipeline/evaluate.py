"""Stage `evaluate`: score bicubic, the L1 generator and SRMAP with the NTIRE 2021 protocol.

Reads params `<profile>.evaluate`; reads `data/<profile>/prepared/valid` and
both generators. Writes `results/<profile>/eval/` (SR images and per-image
CSVs) and the DVC metrics file `results/<profile>/metrics.json`; logs the
means to MLflow.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir, atomic_write_json  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.evaluate import BICUBIC, L1, SRMAP, evaluate_stage, method_slug
    from srmap.tracking import Tracker

    section = ctx.params["evaluate"]
    generators = {
        BICUBIC: None,
        L1: ctx.paths.pretrain / "generator.pt",
        SRMAP: ctx.paths.train_gan / "generator.pt",
    }
    with Tracker(ctx.root, stage="evaluate", profile=ctx.profile, params={"evaluate": section}) as tracker:
        with atomic_dir(ctx.paths.results / "eval") as tmp:
            results = evaluate_stage(valid_dir=ctx.paths.prepared / "valid", generators=generators, out_dir=tmp,
                                     samples=section["samples"], noise_scale=section["noise_scale"],
                                     crop_border=section["crop_border"], lpips_pretrained=section["lpips_pretrained"],
                                     tile=section["tile"], tile_pad=section["tile_pad"])
        atomic_write_json(ctx.paths.results / "metrics.json", results)
        for method, summary in results.items():
            tracker.log_metrics({f"{method_slug(method)}/{k}": v for k, v in summary.items()
                                 if isinstance(v, (int, float))})
            if not section["lpips_pretrained"]:
                tracker.set_tags({"lpips_backbone": "untrained (LPIPS and diversity not comparable)"})
        tracker.log_artifact(ctx.paths.results / "metrics.json")
    print(f"evaluate: metrics in {ctx.paths.results / 'metrics.json'}")


if __name__ == "__main__":
    stage_main("evaluate", main)
