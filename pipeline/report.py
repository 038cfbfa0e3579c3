"""Stage `report`: Table 2, Figures 2-4 and the report page.

Reads params `<profile>.report`; reads `results/<profile>/metrics.json` and `eval/`,
`results/<profile>/baselines/` (the baselines stage's rows, shown first), the validation
images, both loss CSVs and `srmap/published.csv`.
Writes `reports/<profile>/` (table2.md, table2.csv, fig2-4.png, index.html).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.report import build_report

    section = ctx.params["report"]
    results = json.loads((ctx.paths.results / "metrics.json").read_text())
    baselines = json.loads((ctx.paths.baselines / "metrics.json").read_text())
    with atomic_dir(ctx.paths.report) as tmp:
        build_report(results=results, results_dir=ctx.paths.results / "eval", valid_dir=ctx.paths.prepared / "valid",
                     loss_csvs={"pretrain": ctx.paths.pretrain / "losses.csv",
                                "train_gan": ctx.paths.train_gan / "losses.csv"},
                     published_csv=ctx.root / "srmap" / "published.csv", out_dir=tmp,
                     crop_size=section["crop_size"], seed=section["seed"], profile=ctx.profile,
                     baselines=(baselines, ctx.paths.baselines / "eval"))
    print(f"report: open {ctx.paths.report / 'index.html'}")


if __name__ == "__main__":
    stage_main("report", main)
