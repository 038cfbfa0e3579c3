#!/usr/bin/env bash
# Render reports/<profile>/index.html with headless Chromium into docs/report.png
# (the README's screenshot). Usage: scripts/screenshot-report.sh [profile]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-demo}"
page="$PWD/reports/$profile/index.html"
[ -f "$page" ] || { echo "screenshot-report: $page not found (run 'make demo' first)" >&2; exit 2; }
profile_dir="$(mktemp -d)"
trap 'rm -rf "$profile_dir"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$profile_dir" --hide-scrollbars --window-size=1200,2300 \
  --screenshot="$PWD/docs/report.png" "file://$page" >/dev/null 2>&1
echo "wrote docs/report.png"
