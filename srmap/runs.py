"""Pipeline runs side by side: one row per ``pipeline_run`` of a profile, read back from the MLflow store.

Every stage logs its own MLflow run (srmap.tracking); the tag ``pipeline_run``
groups the stages of one pipeline run (under ``dvc exp run``: the DVC
experiment's name). An ablation re-runs only the stages whose parameters
changed, so its group holds, say, ``train_gan`` and ``evaluate`` and reuses the
cached pretraining. This module joins each group into one row: the parameters
its stages logged, the held-out scores its ``evaluate`` run logged
(``<slug>/<metric>``, srmap.evaluate), and each stage's wall time and status.
``srmap runs`` prints the rows as a Markdown table and can plot a training
metric of every group on shared axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from srmap.config import STAGES
from srmap.options import PROJECTED
from srmap.report import _fmt, _plt, _save_figure  # the report's number format and figure helpers
from srmap.tracking import EXPERIMENT, GROUP_TAG

# (column title, MLflow metric key, printed decimals) of the table's score columns.
# "+ P": the row projected onto the input (evaluate.consistency: project); "inner": LR-PSNR with 2 LR px shaved.
SCORE_COLUMNS = [("SRMAP LPIPS ↓", "srmap/lpips", 3), ("SRMAP LR-PSNR ↑", "srmap/lr_psnr", 2),
                 ("SRMAP LR-PSNR inner ↑", "srmap/lr_psnr_inner", 2),
                 ("SRMAP diversity ↑", "srmap/diversity", 2), ("SRMAP PSNR ↑", "srmap/psnr", 2),
                 ("SRMAP SSIM ↑", "srmap/ssim", 4),
                 ("SRMAP + P LPIPS ↓", f"srmap{PROJECTED[0]}/lpips", 3),
                 ("SRMAP + P LR-PSNR ↑", f"srmap{PROJECTED[0]}/lr_psnr", 2),
                 ("SRMAP + P diversity ↑", f"srmap{PROJECTED[0]}/diversity", 2),
                 ("L1 LPIPS ↓", "l1/lpips", 3), ("L1 LR-PSNR ↑", "l1/lr_psnr", 2),
                 ("L1 + P LPIPS ↓", f"l1{PROJECTED[0]}/lpips", 3)]


@dataclass
class StageRun:
    """One stage's MLflow run: its name, status (FINISHED, FAILED, KILLED, RUNNING) and times (ms since epoch)."""

    stage: str
    name: str
    run_id: str
    status: str
    start_ms: int
    end_ms: int | None

    @property
    def minutes(self) -> float | None:
        """Wall time in minutes, None while the run has no end time."""
        return None if self.end_ms is None else (self.end_ms - self.start_ms) / 60_000


@dataclass
class PipelineRun:
    """The stage runs of one ``pipeline_run`` group, with their params and the evaluate run's scores.

    ``stages`` maps a stage to its latest run in the group; ``params`` holds
    every param those runs logged (flattened keys such as ``train_gan.alpha``,
    values as MLflow stores them: strings); ``scores`` the latest metrics of
    the group's ``evaluate`` run when it finished (``srmap/lpips``, ...).
    """

    name: str
    stages: dict[str, StageRun] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def start_ms(self) -> int:
        return min(s.start_ms for s in self.stages.values())


def _store_uri(store: str | Path) -> str:
    text = str(store)
    if "://" in text:
        path = text[len("sqlite:///"):] if text.startswith("sqlite:///") else None
    else:
        path, text = text, f"sqlite:///{Path(text).resolve()}"
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no MLflow store there (run a pipeline first, or pass --store)")
    return text


def collect(store: str | Path, profile: str) -> list[PipelineRun]:
    """Every ``pipeline_run`` group of ``profile`` in the store's ``srmap`` experiment, oldest first.

    ``store`` is a tracking URI (``sqlite:///...``, ``http://...``) or the path
    of an ``mlflow.db`` file. Deleted runs are left out; a stage run more than
    once in a group (a resumed or repeated stage) is represented by its latest
    run. Raises FileNotFoundError when a sqlite store does not exist and
    ValueError when it has no ``srmap`` experiment or no run of ``profile``
    (the message lists the profiles it has).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_store_uri(store))
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise ValueError(f"{store}: no '{EXPERIMENT}' experiment in this MLflow store")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    mine = [r for r in runs if r.data.tags.get("profile") == profile and GROUP_TAG in r.data.tags]
    if not mine:
        have = sorted({r.data.tags.get("profile", "?") for r in runs})
        raise ValueError(f"{store}: no runs of profile '{profile}' (profiles with runs: {', '.join(have) or 'none'})")
    groups: dict[str, PipelineRun] = {}
    for r in sorted(mine, key=lambda r: r.info.start_time):  # later runs of a stage replace earlier ones
        group = groups.setdefault(r.data.tags[GROUP_TAG], PipelineRun(r.data.tags[GROUP_TAG]))
        stage = r.data.tags.get("stage", "?")
        group.stages[stage] = StageRun(stage, r.info.run_name, r.info.run_id, r.info.status, r.info.start_time,
                                       r.info.end_time)
        group.params.update(r.data.params)
        if stage == "evaluate":
            group.scores = dict(r.data.metrics) if r.info.status == "FINISHED" else {}
    return sorted(groups.values(), key=lambda g: g.start_ms)


NOT_LOGGED = "(not logged)"  # a param the reference's run of that stage did not have: an option added since


def changed_params(run: PipelineRun, reference: PipelineRun) -> dict[str, tuple[str, str]]:
    """``{key: (reference value, run value)}`` for the params both groups logged that differ.

    A key of a stage only one group ran is not compared: that group reused the
    stage's cached output instead of running it (DVC and Snakemake re-run only
    changed stages), so the run did not record it. A key of a stage both ran
    that only ``run`` logged is an option the reference's code did not have:
    shown as ``(NOT_LOGGED, value)``.
    """
    ref_sections = {k.split(".", 1)[0] for k in reference.params}
    return {k: (reference.params.get(k, NOT_LOGGED), v) for k, v in sorted(run.params.items())
            if (k in reference.params and reference.params[k] != v)
            or (k not in reference.params and k.split(".", 1)[0] in ref_sections)}


def change_label(run: PipelineRun, reference: PipelineRun) -> str:
    """A short legend text: ``"<name>: alpha 10200, epochs 3"`` (the changed params' last key parts), or the name."""
    if run is reference:
        return f"{run.name} (reference)"
    diff = changed_params(run, reference)
    return f"{run.name}: " + ", ".join(f"{k.rsplit('.', 1)[-1]} {new}" for k, (_, new) in diff.items()) if diff \
        else run.name


def _stages_cell(run: PipelineRun) -> str:
    order = sorted(run.stages.values(), key=lambda s: (STAGES.index(s.stage) if s.stage in STAGES
                                                       else len(STAGES), s.start_ms))
    cells = []
    for s in order:
        text = f"{s.stage} {_fmt(s.minutes, 1)} min" if s.minutes is not None else s.stage
        cells.append(text if s.status == "FINISHED" else f"{text} ({s.status})")
    return ", ".join(cells)


def find(runs: Sequence[PipelineRun], name: str) -> PipelineRun:
    """The group called ``name``; ValueError listing the names there are when it is missing."""
    for run in runs:
        if run.name == name:
            return run
    raise ValueError(f"no pipeline run '{name}' (there are: {', '.join(r.name for r in runs)})")


def runs_markdown(runs: Sequence[PipelineRun], reference: PipelineRun,
                  columns: Sequence[tuple[str, str, int]] = SCORE_COLUMNS) -> str:
    """A Markdown table, one row per group: what changed against ``reference``, the scores, the stages run.

    ``columns`` are (title, MLflow metric key, decimals); a group without a
    finished evaluate run shows "—" in them. The stages cell gives each stage
    the group ran, its wall time in minutes and any status other than FINISHED.
    """
    head = ["pipeline run", "change against " + f"`{reference.name}`"] + [c[0] for c in columns] + ["stages run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + [":-:"] * len(columns) + ["---"]) + "|"]
    for run in runs:
        if run is reference:
            change = "reference"
        else:
            diff = changed_params(run, reference)
            change = ", ".join(f"`{k}` {old} → {new}" for k, (old, new) in diff.items()) or "none"
        cells = [_fmt(run.scores.get(key), digits) for _, key, digits in columns]
        lines.append("| " + " | ".join([f"`{run.name}`", change] + cells + [_stages_cell(run)]) + " |")
    return "\n".join(lines) + "\n"


def plot_histories(store: str | Path, runs: Sequence[PipelineRun], metrics: Sequence[str], out: str | Path,
                   stage: str = "train_gan", labels: Mapping[str, str] | None = None) -> None:
    """Plot each metric's history (against the step) of every group's ``stage`` run on shared axes, one panel each.

    A line per group whose ``stage`` run finished (unfinished runs are left out), smoothed by a centred rolling mean
    over 1/20 of its points (the raw values faint behind it); ``labels`` maps
    a group name to its legend text. Written atomically as a PNG at ``out``.
    Raises ValueError when no group ran ``stage`` or none of them logged one of ``metrics``.
    """
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_store_uri(store))
    with_stage = [r for r in runs if stage in r.stages and r.stages[stage].status == "FINISHED"]
    if not with_stage:
        raise ValueError(f"no pipeline run has a finished '{stage}' stage run")
    histories = {(metric, run.name): sorted(client.get_metric_history(run.stages[stage].run_id, metric),
                                            key=lambda m: m.step) for metric in metrics for run in with_stage}
    for metric in metrics:
        if not any(histories[metric, run.name] for run in with_stage):
            raise ValueError(f"no '{stage}' run logged a metric '{metric}'")
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, run in enumerate(with_stage):
            hist = histories[metric, run.name]
            if not hist:
                continue
            steps = np.array([m.step for m in hist], dtype=np.float64)
            values = np.array([m.value for m in hist], dtype=np.float64)
            color = f"C{i % 10}"
            k = max(len(values) // 20, 1)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid") if k > 1 else values
            ax.plot(steps, values, color=color, lw=0.6, alpha=0.25)
            ax.plot(steps[(k - 1) // 2: (k - 1) // 2 + len(smooth)], smooth, color=color, lw=1.5,
                    label=(labels or {}).get(run.name, run.name))
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(out))
