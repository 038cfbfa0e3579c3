"""MLflow tracking: one run per pipeline stage, in one experiment.

The default store is embedded: ``sqlite:///<project>/mlflow.db`` with artifacts
under ``<project>/mlartifacts``. ``MLFLOW_TRACKING_URI`` overrides the store.
An unreachable store never stops training: the tracker warns once and turns
into a no-op, and the stage's CSV files still hold every metric.

The experiment carries ``mlflow.experimentKind = custom_model_development`` so
that MLflow 3's UI opens it on the runs table (not the GenAI trace overview).
Runs are named ``<stage>-<DVC experiment>`` under ``dvc exp run`` (DVC exports
``DVC_EXP_NAME`` to the stage) and ``<stage>-<profile>-<hash of the stage's
params>`` otherwise. The tag ``pipeline_run`` groups the stages of one pipeline
run across their separate processes: the DVC experiment name, or else
``<profile>-<hash>`` of the whole profile section of params.yaml and the git
commit. Stages that ran with the same parameters on the same commit share it,
which is exactly when DVC or Snakemake would treat them as one pipeline; a
re-run of the same pipeline joins its group (tell the runs apart by start time).
"""

from __future__ import annotations

import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping

EXPERIMENT = "srmap"
# Read by MLflow 3.x's UI to pick the experiment's landing page: the runs table for model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
GROUP_TAG = "pipeline_run"


def params_hash(obj: Any, length: int = 8) -> str:
    """A short hex SHA-256 of ``obj`` as canonical JSON (sorted keys); stable across processes and machines."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def run_identity(stage: str, profile: str, params: Mapping[str, Any], pipeline_params: Mapping[str, Any] | None,
                 commit: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(run name, pipeline_run tag)`` of a stage's run; see the module docstring for the rule."""
    env = os.environ if env is None else env
    exp = env.get("DVC_EXP_NAME")
    if exp:
        return f"{stage}-{exp}", exp
    group = params_hash({"profile": profile, "params": pipeline_params if pipeline_params is not None else params,
                         "commit": commit})
    return f"{stage}-{profile}-{params_hash(params)}", f"{profile}-{group}"


def folder_fingerprint(folder: Path) -> dict[str, Any]:
    """SHA-256 fingerprint of every file under ``folder``: {'sha256': hex, 'files': n, 'bytes': total}.

    The digest covers each file's path relative to ``folder`` (sorted, POSIX)
    and its content's SHA-256, so renaming or editing any file changes it.
    Raises FileNotFoundError when ``folder`` is not a directory.
    """
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found")
    outer = hashlib.sha256()
    files = total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        outer.update(f"{path.relative_to(folder).as_posix()}\0{digest}\n".encode())
        files += 1
        total += path.stat().st_size
    return {"sha256": outer.hexdigest(), "files": files, "bytes": total}


def default_tracking_uri(root: Path) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` or the project's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str:
    """The HEAD commit of the repository at ``root``, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _probe(uri: str, timeout: float = 3.0) -> None:
    """Raise OSError unless an MLflow server answers at ``uri`` within ``timeout`` seconds."""
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
        if r.status != 200:
            raise OSError(f"{uri}/health answered HTTP {r.status}")


class Tracker:
    """A context manager around one MLflow run; every call is safe when the store is down.

    ``Tracker(root, stage="pretrain", profile="demo", params=cfg,
    pipeline_params=profile_section)`` opens a run named and grouped as the
    module docstring says, tagged with the stage, profile and git commit, logs
    ``params`` flattened, and exposes ``log_metrics``, ``log_artifact``,
    ``log_dataset`` and ``set_tags``. ``pipeline_params`` (the whole profile
    section) defines the ``pipeline_run`` group; without it the stage's
    ``params`` do.
    """

    def __init__(self, root: Path, *, stage: str, profile: str, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None, enabled: bool = True,
                 pipeline_params: Mapping[str, Any] | None = None):
        self.root = Path(root).resolve()
        self.stage, self.profile = stage, profile
        self.params = dict(params or {})
        self.pipeline_params = pipeline_params
        self.tags = dict(tags or {})
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop the stage
            self._disable(f"could not start an MLflow run ({type(exc).__name__}: {exc})")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._client is None or self.run_id is None:
            return
        from srmap.utils import Interrupted

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (Interrupted, KeyboardInterrupt)):
            status = "KILLED"  # a signal or Ctrl-C: the stage can be resumed
        else:
            status = "FAILED"
        self._safe(self._client.set_terminated, self.run_id, status)

    def _start(self) -> None:
        uri = default_tracking_uri(self.root)
        if uri.startswith(("http://", "https://")):
            # MLflow's own client retries a dead server with backoff for minutes;
            # a training stage should notice in seconds and carry on without it.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            _probe(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
                # The sqlite store would otherwise put artifacts under the current
                # working directory; pin them to the project.
                artifact_location = (self.root / "mlartifacts").as_uri()
            exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifact_location,
                                              tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():  # stores made before the tag existed
                if exp.tags.get(k) != v:
                    client.set_experiment_tag(exp_id, k, v)
        commit = git_commit(self.root)
        name, group = run_identity(self.stage, self.profile, self.params, self.pipeline_params, commit)
        tags = {"stage": self.stage, "profile": self.profile, "git_commit": commit, GROUP_TAG: group,
                "mlflow.runName": name, **self.tags}
        run = client.create_run(exp_id, tags=tags)
        self._client, self.run_id = client, run.info.run_id
        from mlflow.entities import Param

        flat = flatten(self.params)
        batch = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(batch), 100):
            client.log_batch(self.run_id, params=batch[i:i + 100])

    def _disable(self, why: str) -> None:
        warnings.warn(f"MLflow tracking disabled for stage '{self.stage}': {why}; metrics stay in the CSV files",
                      RuntimeWarning, stacklevel=3)
        self._client, self.run_id = None, None

    def _safe(self, fn, *args, **kwargs) -> None:
        if self._client is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see class docstring
            self._disable(f"{type(exc).__name__}: {exc}")

    # -- logging -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while a run is open and the store answers."""
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite float metrics at ``step``; non-finite values are skipped (MLflow rejects NaN in some stores)."""
        if self._client is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
              if v is not None and math.isfinite(float(v))]
        if ms:
            self._safe(self._client.log_batch, self.run_id, metrics=ms)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        if self._client is not None:
            self._safe(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dataset(self, folder: str | os.PathLike, *, name: str, context: str = "training") -> None:
        """Log ``folder`` as the run's MLflow dataset input, its digest the start of ``folder_fingerprint``.

        The dataset's profile holds the full SHA-256, the file count and bytes;
        the run also gets the tag ``dataset_sha256``. Hashing reads every file
        once (seconds for DIV2K's prepared split).
        """
        if self._client is None:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        folder = Path(folder).resolve()
        fp = folder_fingerprint(folder)
        dataset = Dataset(name=name, digest=fp["sha256"][:16], source_type="local",
                          source=json.dumps({"uri": folder.as_uri()}), profile=json.dumps(fp))
        self._safe(self._client.log_inputs, self.run_id,
                   [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
        self.set_tags({"dataset_sha256": fp["sha256"]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set string tags on the run."""
        for k, v in tags.items():
            if self._client is not None:
                self._safe(self._client.set_tag, self.run_id, k, str(v))


class NullTracker:
    """A tracker that records nothing: what training gets on ranks other than 0, or without a store.

    Has :class:`Tracker`'s logging methods, so callers never check whether
    tracking is on.
    """

    active = False

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record nothing."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Record nothing."""

    def log_dataset(self, folder: str | os.PathLike, *, name: str, context: str = "training") -> None:
        """Record nothing."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record nothing."""


NULL_TRACKER = NullTracker()


def runs_url(root: Path, port: int) -> str:
    """Link to the srmap experiment's runs table in ``mlflow ui`` on 127.0.0.1:``port`` (the list if none yet).

    MLflow 3.17's UI shows its GenAI view unless the link asks for the
    model-training one (``workflowType=machine_learning``).
    """
    base = f"http://127.0.0.1:{port}/#/experiments"
    exp = None
    uri = default_tracking_uri(root)
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file():
        try:
            from mlflow.tracking import MlflowClient

            exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
        except Exception:  # noqa: BLE001 - only a convenience link; the UI itself reports store problems
            exp = None
    return f"{base}/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else \
        f"{base}?workflowType=machine_learning"


if __name__ == "__main__":  # python -m srmap.tracking [port]: the link `make mlflow-ui` prints
    import sys

    from srmap.utils import project_root

    print(runs_url(project_root(), int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
