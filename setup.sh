#!/usr/bin/env bash
# One-time set-up, safe to re-run: the offline synthesizers (apt) and a virtual
# environment with requirements.txt (+ pytest and ruff for the tests) in .venv/.
set -euo pipefail
cd "$(dirname "$0")"
APT_PKGS="espeak-ng flite"
missing=""
for p in espeak-ng flite; do command -v "$p" >/dev/null || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing$missing (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PKGS >/dev/null
  else
    echo "setup: the toy world needs:$missing. Run:  sudo apt-get install -y $APT_PKGS" >&2
    exit 1
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: pip install -r requirements.txt -r requirements-dev.txt (first time: a few minutes)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
  echo "$want" > $stamp
fi
