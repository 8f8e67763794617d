#!/usr/bin/env bash
# Install what Forgeline needs on Debian 12 / Python 3.11: apt packages when missing, then a
# project venv (.venv) with requirements.txt under the exact versions of requirements-lock.txt.
# torch is pinned to 2.13.0 (a CPU wheel); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

# wordnet-base: METEOR offline; chromium: the UI test; postgresql: the scale-out test;
# dataset-fashion-mnist: the captioning pipeline's real images (read in place by tasks/img_data.py)
apt_pkgs=(tesseract-ocr tesseract-ocr-eng wordnet-base chromium postgresql dataset-fashion-mnist)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install: apt packages ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.forgeline-requirements
want=$(cat requirements.txt requirements-lock.txt | sha256sum | cut -c1-64)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: pip packages (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -c requirements-lock.txt
  echo "$want" > "$stamp"
fi
# the `forgeline` command (editable: it runs this checkout's code)
[ -x .venv/bin/forgeline ] || .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
