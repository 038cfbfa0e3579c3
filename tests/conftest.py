"""Shared fixtures. `demo_run` runs the whole demo pipeline once per test session
in a fresh clone (through `dvc repro`), for the end-to-end tests."""

from __future__ import annotations

import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tool_env(root: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for running the project's tools in a checkout: the venv first on PATH,
    the checkout's srmap first on PYTHONPATH, and an MLflow store inside the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if root is not None:
        env["PYTHONPATH"] = str(root)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def edit_params(params: Path, edit) -> None:
    """Apply ``edit(doc)`` to the parsed ``params`` file and write it back (a ruamel round trip that keeps the
    file's comments, as DVC's ``-S`` does)."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    doc = yaml_rt.load(params)
    edit(doc)
    yaml_rt.dump(doc, params)


def make_prepared(root: Path, n: int = 3) -> Path:
    """``n`` smooth random 48x64 HR images and their MATLAB-bicubic x4 LR as .npy, laid out
    as the degrade stage stores a training split (root/hr, root/lr)."""
    import numpy as np
    from PIL import Image

    from srmap.resize import imresize

    rng = np.random.default_rng(0)
    for sub in ("hr", "lr"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
        hr = np.asarray(Image.fromarray(coarse).resize((64, 48), Image.BICUBIC))
        np.save(root / "hr" / f"img{i}.npy", hr)
        np.save(root / "lr" / f"img{i}.npy", imresize(hr, 0.25))
    return root


def clone_repo(dest: Path) -> Path:
    """`git clone` this repository's committed HEAD into ``dest`` (what a new user gets)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A fresh clone on which `dvc repro` has run the demo profile end to end."""
    if shutil.which("dvc", path=str(VENV_BIN)) is None:
        pytest.fail("dvc is not installed in the test environment (run `make test`)")
    clone = clone_repo(tmp_path_factory.mktemp("e2e") / "srmap")
    proc = subprocess.run(["dvc", "repro"], cwd=clone, env=tool_env(clone), capture_output=True, text=True,
                          timeout=1800)
    (clone / "repro.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return clone


class _Handler(BaseHTTPRequestHandler):
    """Serves ``files``; honours ``Range: bytes=N-``; cuts the first response of a name after ``drop[name]`` bytes."""

    files: dict[str, bytes] = {}
    drop: dict[str, int] = {}
    log: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        name = self.path.lstrip("/")
        self.log.append((name, self.headers.get("Range")))
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.drop.pop(name, None)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.drop, _Handler.log = {}, {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()
