#!/usr/bin/env bash
# Render the MLflow UI's runs table of the `srmap` experiment with headless Chromium into
# docs/mlflow.png (the README's screenshot). Run after `make demo`.
# Usage: scripts/screenshot-mlflow.sh [store-uri [out.png [page]]]
#   store-uri  default sqlite:///$PWD/mlflow.db
#   out.png    default docs/mlflow.png
#   page       the UI route after '#/', default the experiment's runs table; e.g. to put runs side by side:
#              'compare-runs?runs=["<run id>","<run id>"]&experiments=["<experiment id>"]'
# SCREENSHOT_SIZE=width,height sets the browser window (default 1600,900).
set -euo pipefail
out="$(realpath -m "${2:-$(dirname "$0")/../docs/mlflow.png}")"  # relative to the caller's folder
cd "$(dirname "$0")/.."
store="${1:-sqlite:///$PWD/mlflow.db}"
case "$store" in sqlite:///*) [ -f "${store#sqlite:///}" ] || {
  echo "screenshot-mlflow: ${store#sqlite:///} not found (run 'make demo' first)" >&2; exit 2; } ;; esac
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
work="$(mktemp -d)"
mlflow server --backend-store-uri "$store" --default-artifact-root "$PWD/mlartifacts" \
  --host 127.0.0.1 --port "$port" --workers 1 >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 120); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "screenshot-mlflow: mlflow server exited:" >&2; tail -5 "$work/server.log" >&2; exit 1; }
  sleep 1
done
exp_id="$(curl -fs "http://127.0.0.1:$port/api/2.0/mlflow/experiments/get-by-name?experiment_name=srmap" |
  python -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')"
# The experiment page in the "Model training" view: MLflow 3.17 picks the view from ?workflowType= (else the
# browser's last choice, GenAI at first); with that view the experiment kind tag sends it to the runs table.
chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$work/profile" --hide-scrollbars \
  --window-size="${SCREENSHOT_SIZE:-1600,900}" --virtual-time-budget=20000 \
  --screenshot="$out" "http://127.0.0.1:$port/#/${3:-experiments/$exp_id?workflowType=machine_learning}" >/dev/null 2>&1
echo "wrote $out (experiment $exp_id)"
