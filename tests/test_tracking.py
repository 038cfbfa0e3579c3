"""MLflow tracking: runs, tags and flattened params land in the store; a dead store never stops a stage."""

from __future__ import annotations

import re
import socket
import time

import pytest

from srmap.tracking import Tracker, flatten


def test_flatten_nests_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_run_lands_in_the_sqlite_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker(tmp_path, stage="pretrain", profile="demo", params={"pretrain": {"lr": 0.5}}) as tr:
        assert tr.active
        for step in (10, 20):
            tr.log_metrics({"l1": 1.0 / step, "nan_is_skipped": float("nan")}, step)
        (tmp_path / "w.txt").write_text("weights")
        tr.log_artifact(tmp_path / "w.txt")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["profile"] == "demo"
    assert "git_commit" in run.data.tags
    assert run.data.params["pretrain.lr"] == "0.5"
    assert [m.step for m in client.get_metric_history(tr.run_id, "l1")] == [10, 20]
    assert "nan_is_skipped" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(tr.run_id)] == ["w.txt"]
    # artifacts live in the project folder, not wherever the stage happened to run
    assert (tmp_path / "mlartifacts").is_dir()


def test_failed_stage_marks_the_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path, stage="train_gan", profile="demo") as tr:
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(tr.run_id).info.status == "FAILED"


def test_unreachable_store_warns_and_continues(tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="MLflow tracking disabled for stage 'pretrain'.*CSV"):
        with Tracker(tmp_path, stage="pretrain", profile="demo", params={"a": 1}) as tr:
            assert not tr.active
            tr.log_metrics({"l1": 0.1}, 1)  # no-ops, no exceptions
            tr.log_artifact(tmp_path / "missing.txt")
            tr.set_tags({"k": "v"})
    assert time.monotonic() - t0 < 30


def test_experiment_kind_run_names_group_and_per_method_metrics(tmp_path, monkeypatch):
    """What the MLflow UI shows: the runs table (experiment kind), runs named by stage, one pipeline group."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    profile = {"pretrain": {"lr": 0.5}, "evaluate": {"samples": 10}}
    with Tracker(tmp_path, stage="pretrain", profile="demo", params={"pretrain": profile["pretrain"]},
                 pipeline_params=profile) as pre:
        pass
    with Tracker(tmp_path, stage="evaluate", profile="demo", params={"evaluate": profile["evaluate"]},
                 pipeline_params=profile) as ev:
        ev.log_metrics({"srmap/lpips": 0.25, "bicubic/lpips": 0.5})
    monkeypatch.setenv("DVC_EXP_NAME", "nimble-crab")
    with Tracker(tmp_path, stage="evaluate", profile="demo", params={"evaluate": profile["evaluate"]},
                 pipeline_params=profile) as exp:
        pass

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("srmap")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    p, e, x = runs[pre.run_id], runs[ev.run_id], runs[exp.run_id]
    assert re.fullmatch(r"pretrain-demo-[0-9a-f]{8}", p.info.run_name)
    assert re.fullmatch(r"evaluate-demo-[0-9a-f]{8}", e.info.run_name) and e.info.run_name[-8:] != p.info.run_name[-8:]
    assert x.info.run_name == "evaluate-nimble-crab" and x.data.tags["pipeline_run"] == "nimble-crab"
    # the two stages of one pipeline (same profile params, same commit) share the group tag
    assert p.data.tags["pipeline_run"] == e.data.tags["pipeline_run"] != x.data.tags["pipeline_run"]
    assert e.data.metrics == {"srmap/lpips": 0.25, "bicubic/lpips": 0.5}


def test_pipeline_group_follows_the_params():
    from srmap.tracking import run_identity

    base = {"pretrain": {"lr": 0.5}}
    name, group = run_identity("pretrain", "demo", base, base, "abc", env={})
    assert run_identity("pretrain", "demo", base, base, "abc", env={}) == (name, group)
    assert run_identity("pretrain", "demo", base, {"pretrain": {"lr": 0.1}}, "abc", env={})[1] != group
    assert run_identity("pretrain", "demo", base, base, "def", env={})[1] != group


def test_existing_experiment_gains_the_kind_tag(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("srmap", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with Tracker(tmp_path, stage="pretrain", profile="demo"):
        pass
    assert client.get_experiment_by_name("srmap").tags["mlflow.experimentKind"] == "custom_model_development"


def test_dataset_input_with_fingerprint(tmp_path, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    from srmap.tracking import folder_fingerprint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "prepared" / "train"
    (data / "hr").mkdir(parents=True)
    (data / "hr" / "a.npy").write_bytes(b"\x00" * 100)
    (data / "hr" / "b.npy").write_bytes(b"\x01" * 50)
    fp = folder_fingerprint(data)
    assert fp["files"] == 2 and fp["bytes"] == 150 and len(fp["sha256"]) == 64
    with Tracker(tmp_path, stage="pretrain", profile="demo") as tr:
        tr.log_dataset(data, name="demo-train")
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tr.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "demo-train" and inp.dataset.digest == fp["sha256"][:16]
    assert json.loads(inp.dataset.profile) == fp
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["dataset_sha256"] == fp["sha256"]
    # any change to a file's content or name changes the fingerprint
    (data / "hr" / "b.npy").write_bytes(b"\x02" * 50)
    edited = folder_fingerprint(data)["sha256"]
    (data / "hr" / "b.npy").rename(data / "hr" / "c.npy")
    assert len({fp["sha256"], edited, folder_fingerprint(data)["sha256"]}) == 3


def test_runs_url_opens_the_model_training_runs_table(tmp_path, monkeypatch):
    from srmap.tracking import runs_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runs_url(tmp_path, 5000) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert not (tmp_path / "mlflow.db").exists()  # asking for the link creates no store
    with Tracker(tmp_path, stage="pretrain", profile="demo"):
        pass
    assert re.fullmatch(r"http://127\.0\.0\.1:5001/#/experiments/\d+/runs\?workflowType=machine_learning",
                        runs_url(tmp_path, 5001))
