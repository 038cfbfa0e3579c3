"""MLflow tracking: runs, tags and flattened params land in the store; a dead store never stops a stage."""

from __future__ import annotations

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
