"""End to end: a fresh clone runs the demo through `dvc repro`; the report, the metrics
and the MLflow runs must exist and make sense, and a second `dvc repro` runs nothing."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import tool_env

pytestmark = pytest.mark.slow
# every row of the demo's Table 2: the baselines stage's, then evaluate's (evaluate.consistency: [none, project])
BASELINE_ROWS = ["bicubic", "bicubic_projected"]
EVALUATE_ROWS = ["l1", "srmap", "l1_projected", "srmap_projected"]
METHODS = BASELINE_ROWS + EVALUATE_ROWS
KEYS = ["lpips", "lr_psnr", "lr_psnr_worst", "diversity", "psnr", "ssim", "psnr_y", "ssim_y", "lr_psnr_inner",
        "samples", "images"]


def test_report_and_metrics_exist_and_are_finite(demo_run: Path):
    report = demo_run / "reports" / "demo"
    for name in ("table2.md", "table2.csv", "fig2.png", "fig3.png", "fig4.png", "index.html"):
        assert (report / name).stat().st_size > 0, name
    metrics = json.loads((demo_run / "results" / "demo" / "metrics.json").read_text())
    baselines = json.loads((demo_run / "results" / "demo" / "baselines" / "metrics.json").read_text())
    assert sorted(baselines) == BASELINE_ROWS  # the demo configures no published model (no weights offline)
    assert sorted(metrics) == sorted(EVALUATE_ROWS)  # metrics.json is written with sorted keys
    metrics = {**baselines, **metrics}
    for method in METHODS:
        assert sorted(metrics[method]) == sorted(KEYS)
        for key, value in metrics[method].items():
            assert re.fullmatch(r"[a-z0-9_]+", key)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (method, key, value)
            assert math.isfinite(value), (method, key, value)
    # deterministic methods have no diversity; SRMAP's samples differ
    assert metrics["bicubic"]["diversity"] == 0 and metrics["l1"]["diversity"] == 0
    assert metrics["srmap"]["diversity"] > 0 and metrics["srmap"]["samples"] == 10
    for row in ("bicubic_projected", "l1_projected", "srmap_projected"):  # NTIRE 2021's consistency mark
        assert metrics[row]["lr_psnr_worst"] >= 45, (row, metrics[row])
    info = json.loads((demo_run / "results" / "demo" / "eval" / "methods.json").read_text())
    assert info["lpips"]["pretrained"] is True  # the demo scores with the ImageNet AlexNet, offline
    table = pd.read_csv(report / "table2.csv")
    assert len(table) >= 3
    md = (report / "table2.md").read_text()
    assert "SRMAP (ours)" in md and "| Bicubic |" in md and "published, not re-run" in md.lower()
    assert f"LPIPS weights: {info['lpips']['weights']}" in md and "not comparable" not in md


def test_training_loss_csvs(demo_run: Path):
    pre = pd.read_csv(demo_run / "models" / "demo" / "pretrain" / "losses.csv")
    gan = pd.read_csv(demo_run / "models" / "demo" / "train_gan" / "losses.csv")
    assert {"step", "l1"} <= set(pre.columns) and len(pre) > 1
    assert {"step", "fidelity", "generator", "critic", "r1"} <= set(gan.columns) and len(gan) > 1
    assert pre["step"].is_monotonic_increasing and gan["step"].is_monotonic_increasing
    # pretraining with L1 must actually reduce the loss on the demo images
    assert pre["l1"].iloc[-3:].mean() < pre["l1"].iloc[:3].mean()


def test_second_repro_runs_nothing(demo_run: Path):
    t0 = time.monotonic()
    proc = subprocess.run(["dvc", "repro"], cwd=demo_run, env=tool_env(demo_run), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Running stage" not in proc.stdout, proc.stdout
    assert time.monotonic() - t0 < 120
    status = subprocess.run(["dvc", "status"], cwd=demo_run, env=tool_env(demo_run), capture_output=True,
                            text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout


def test_dvc_metrics_show(demo_run: Path):
    proc = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=demo_run, env=tool_env(demo_run),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    (data,) = [v["data"] for v in shown.values()]
    assert sorted(data["results/demo/metrics.json"]["data"]) == sorted(EVALUATE_ROWS)
    assert sorted(data["results/demo/baselines/metrics.json"]["data"]) == sorted(BASELINE_ROWS)


def test_dvc_metrics_diff_between_two_runs(demo_run: Path, tmp_path: Path, capsys):
    """Two `dvc exp run`s of the demo (the second with another noise scale): `dvc metrics diff` prints one
    short row per metric, `dvc exp show --only-changed` stays readable, MLflow names the runs after them,
    and `srmap runs` puts the experiment's row next to the pipeline's with the changed parameter."""
    work = tmp_path / "srmap"
    shutil.copytree(demo_run, work, symlinks=True)
    env = tool_env(work, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@example.org")

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    dvc("exp", "run", "-n", "base")
    dvc("exp", "run", "-n", "calmer", "-S", "demo.evaluate.noise_scale=0.5")
    diff = dvc("metrics", "diff", "base", "calmer", "--all", "--md")
    rows = [line for line in diff.splitlines() if line.startswith("| results/")]
    names = [line.split("|")[2].strip() for line in rows]
    assert sorted(names) == sorted(f"{m}.{k}" for m in METHODS for k in KEYS), diff  # one row per metric
    assert all(line.startswith("| results/demo/baselines/metrics.json") == name.startswith("bicubic")
               for line, name in zip(rows, names)), diff
    assert "…" not in diff, diff  # no name or value cut short
    changed = dvc("metrics", "diff", "base", "calmer", "--md")  # only SRMAP's samples depend on the noise
    assert "srmap.diversity" in changed and "bicubic." not in changed, changed
    show = dvc("exp", "show", "--only-changed", "--md", "--no-pager")
    assert "calmer" in show and "srmap.lpips" in show and "…" not in show, show

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("srmap")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_run = 'calmer'")
    assert [r.info.run_name for r in runs] == ["evaluate-calmer"]
    assert runs[0].data.metrics["srmap/lpips"] == pytest.approx(
        json.loads((work / "results" / "demo" / "metrics.json").read_text())["srmap"]["lpips"])

    from srmap.cli import main

    capsys.readouterr()
    assert main(["runs", "--store", str(work / "mlflow.db"), "--profile", "demo", "--reference", "calmer"]) == 0
    rows = {line.split(" | ")[0].strip("| `"): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert len(rows) == 2 and "reference" in rows["calmer"], rows  # `base` re-ran nothing, so logged nothing
    (first,) = set(rows) - {"calmer"}
    assert "`evaluate.noise_scale` 0.5 → 1.0" in rows[first], rows
    assert all(s in rows[first] for s in ("pretrain", "train_gan", "evaluate")), rows
    lpips = f"{runs[0].data.metrics['srmap/lpips']:.3f}"
    assert f"| {lpips} |" in rows["calmer"], rows


def _runs_by_stage(client, exp_id):
    runs = client.search_runs([exp_id])
    return {r.data.tags["stage"]: r for r in runs}


def test_mlflow_runs_through_the_client(demo_run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{demo_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("srmap")
    assert exp is not None
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    runs = _runs_by_stage(client, exp.experiment_id)
    assert {"pretrain", "train_gan", "baselines", "evaluate"} <= set(runs)
    # one pipeline run: the stages share the group tag; each run's name starts with its stage
    assert len({runs[s].data.tags["pipeline_run"] for s in ("pretrain", "train_gan", "baselines", "evaluate")}) == 1
    for stage in ("pretrain", "train_gan", "baselines", "evaluate"):
        assert re.fullmatch(rf"{stage}-demo-[0-9a-f]{{8}}", runs[stage].info.run_name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=demo_run, capture_output=True, text=True).stdout.strip()
    for stage in ("pretrain", "train_gan", "baselines", "evaluate"):
        run = runs[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["profile"] == "demo" and run.data.tags["git_commit"] == head
    assert runs["pretrain"].data.params["pretrain.lr"] == "0.0005"
    history = client.get_metric_history(runs["train_gan"].info.run_id, "fidelity")
    assert len(history) > 1 and len({m.step for m in history}) == len(history)
    artifacts = [a.path for a in client.list_artifacts(runs["train_gan"].info.run_id)]
    assert any("generator" in a for a in artifacts), artifacts
    ev = runs["evaluate"].data.metrics
    assert {f"{m}/{k}" for m in ("l1", "srmap") for k in KEYS} <= set(ev)
    assert {f"bicubic/{k}" for k in KEYS} <= set(runs["baselines"].data.metrics)
    metrics = json.loads((demo_run / "results" / "demo" / "metrics.json").read_text())
    assert ev["srmap/lpips"] == metrics["srmap"]["lpips"]
    # the training stages log their data as an MLflow dataset input with its fingerprint
    for stage in ("pretrain", "train_gan"):
        (inp,) = runs[stage].inputs.dataset_inputs
        assert inp.dataset.name == "demo-train"
        assert runs[stage].data.tags["dataset_sha256"].startswith(inp.dataset.digest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_serves_the_runs_over_rest(demo_run: Path, tmp_path: Path):
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{demo_run / 'mlflow.db'}",
                               "--default-artifact-root", (demo_run / "mlartifacts").as_uri(),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=tool_env(demo_run), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(1)

        def api(path: str, body: dict | None = None) -> dict:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())

        exp = api("experiments/get-by-name?experiment_name=srmap")["experiment"]
        runs = api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        stages = {t["value"]: r for r in runs for t in r["data"]["tags"] if t["key"] == "stage"}
        assert {"pretrain", "train_gan", "evaluate"} <= set(stages)
        run_id = stages["pretrain"]["info"]["run_id"]
        hist = api(f"metrics/get-history?run_id={run_id}&metric_key=l1")["metrics"]
        assert len(hist) > 1 and all(math.isfinite(m["value"]) for m in hist)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_inference_edits_leave_the_training_stages_up_to_date(demo_run: Path):
    """Training's code is its import closure, which excludes the inference side: an edit to `srmap upscale`'s
    module or the spandrel loader re-runs the stages that use them, never pretrain or train_gan."""
    edited = [demo_run / "srmap" / "inference.py", demo_run / "srmap" / "loaders.py"]
    originals = {p: p.read_text() for p in edited}
    try:
        for p in edited:
            p.write_text(originals[p] + "\n# an edit to the inference side\n")
        proc = subprocess.run(["dvc", "status", "--json"], cwd=demo_run, env=tool_env(demo_run),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        changed = set(json.loads(proc.stdout))
        assert "evaluate" in changed and not changed & {"pretrain", "train_gan"}, changed
    finally:
        for p, text in originals.items():
            p.write_text(text)
