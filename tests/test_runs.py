"""`srmap runs`: pipeline runs of a profile joined from the MLflow store into one row each."""

from __future__ import annotations

import pytest

from srmap.cli import main
from srmap.runs import change_label, changed_params, collect, find, runs_markdown
from srmap.tracking import Tracker

GAN = {"alpha": 2550.0, "r1_gamma": 0.0002, "epochs": 7}


def _pipeline(root, monkeypatch, name, *, train_gan=GAN, pretrain=True, evaluate=True, fail_gan=False,
              profile="study"):
    """Log one pipeline run the way the stages do: one MLflow run per stage, grouped by the DVC exp name."""
    monkeypatch.setenv("DVC_EXP_NAME", name)
    if pretrain:
        with Tracker(root, stage="pretrain", profile=profile, params={"pretrain": {"lr": 5e-4}}):
            pass
    try:
        with Tracker(root, stage="train_gan", profile=profile, params={"train_gan": train_gan}) as tr:
            for step in (20, 40, 60):
                tr.log_metrics({"fidelity": 0.004 + step * 1e-5 * train_gan["alpha"] / 2550, "critic": 0.5}, step)
            if fail_gan:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        return
    if evaluate:
        with Tracker(root, stage="evaluate", profile=profile, params={"evaluate": {"samples": 10}}) as ev:
            lr_psnr = 40.0 + train_gan["alpha"] / 2550
            ev.log_metrics({"srmap/lpips": 0.23, "srmap/lr_psnr": lr_psnr, "srmap/diversity": 8.1,
                            "srmap/psnr": 23.6, "srmap/ssim": 0.685, "l1/lpips": 0.27, "l1/lr_psnr": 42.47})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (each MLflow sqlite store takes seconds to create)."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _pipeline(root, mp, "nicer-leaf")
        _pipeline(root, mp, "beery-rale", train_gan={**GAN, "alpha": 10200}, pretrain=False, fail_gan=True)
        _pipeline(root, mp, "flaky-glen", train_gan={**GAN, "alpha": 10200}, pretrain=False)
        _pipeline(root, mp, "demo-run", profile="demo")
    return root / "mlflow.db"


def test_groups_join_stages_params_and_scores(store):
    runs = collect(store, "study")
    assert [r.name for r in runs] == ["nicer-leaf", "beery-rale", "flaky-glen"]  # oldest first; demo left out
    ref, killed, abl = runs
    assert set(ref.stages) == {"pretrain", "train_gan", "evaluate"} and set(abl.stages) == {"train_gan", "evaluate"}
    assert killed.stages["train_gan"].status == "KILLED" and killed.scores == {}
    assert abl.scores["srmap/lr_psnr"] == pytest.approx(44.0)
    # pretrain.lr was logged by the reference only (the ablation reused the cached stage): not compared
    assert changed_params(abl, ref) == {"train_gan.alpha": ("2550.0", "10200")}
    table = runs_markdown(runs, ref)
    rows = {line.split(" | ")[0].strip("| `"): line for line in table.splitlines()[2:]}
    assert "reference" in rows["nicer-leaf"] and "| 41.00 |" in rows["nicer-leaf"]
    assert "`train_gan.alpha` 2550.0 → 10200" in rows["flaky-glen"] and "| 44.00 |" in rows["flaky-glen"]
    assert "train_gan" in rows["beery-rale"] and "(KILLED)" in rows["beery-rale"] and "| — |" in rows["beery-rale"]
    assert "pretrain" not in rows["flaky-glen"].split("|")[-2]  # stages run: train_gan and evaluate only
    assert change_label(abl, ref) == "flaky-glen: alpha 10200" and change_label(ref, ref) == "nicer-leaf (reference)"
    with pytest.raises(ValueError, match="no pipeline run 'nope' \\(there are: nicer-leaf, beery-rale, flaky-glen"):
        find(runs, "nope")


def test_an_option_the_reference_did_not_have_shows_as_not_logged():
    from srmap.runs import NOT_LOGGED, PipelineRun

    ref = PipelineRun("old", params={"train_gan.alpha": "2550.0", "pretrain.lr": "0.0005"})
    new = PipelineRun("new", params={"train_gan.alpha": "2550.0", "train_gan.fidelity_context": "True",
                                     "evaluate.samples": "10"})  # evaluate: a stage the reference did not log
    assert changed_params(new, ref) == {"train_gan.fidelity_context": (NOT_LOGGED, "True")}


def test_cli_prints_the_table_and_plots(store, tmp_path, capsys):
    png = tmp_path / "fig" / "fidelity.png"
    png.parent.mkdir()
    assert main(["runs", "--store", str(store), "--profile", "study", "--reference", "flaky-glen",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "change against `flaky-glen`" in out
    assert "`train_gan.alpha` 10200 → 2550.0" in out  # the default row, seen from the ablation
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--profile", "paper"], "no runs of profile 'paper' (profiles with runs: demo, study)"),
    (["--profile", "study", "--reference", "x"], "no pipeline run 'x'"),
    (["--profile", "study", "--plot-metrics", "fidelity", "nosuch", "--plot", "f.png"],
     "no 'train_gan' run logged a metric 'nosuch'"),
])
def test_cli_bad_input_is_one_line(store, capsys, monkeypatch, args, message):
    monkeypatch.chdir(store.parent)  # where a wrongly written f.png would land
    code = main(["runs", "--store", str(store), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("srmap runs: error: ")
    assert message in err and not (store.parent / "f.png").exists()


def test_missing_store_is_one_line(tmp_path, capsys):
    assert main(["runs", "--store", str(tmp_path / "mlflow.db"), "--profile", "study"]) == 2
    err = capsys.readouterr().err
    assert "mlflow.db: no MLflow store there" in err and len(err.strip().splitlines()) == 1
