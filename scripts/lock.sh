#!/usr/bin/env bash
# Write requirements.lock: every package that tinyserve[dev,bench] pulls in, pinned (make lock).
#
# Resolves in a fresh virtual environment, so nothing already installed leaks in, and keeps
# PyTorch's CPU build: pip's find-links here hold torch 2.13.0+cpu, which `torch==2.13.0`
# selects before the CUDA build of PyPI, so the lock writes torch without its `+cpu` label.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-requirements.lock}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet -e '.[dev,bench]'
"${pip[@]}" check
platform=$("$tmp/venv/bin/python" -c \
  'import platform; print(f"CPython {platform.python_version()} on {platform.system()} {platform.machine()}")')
{
  echo "# Every package of tinyserve[dev,bench] (the development and CI environment), pinned."
  echo "# Written by \`make lock\` (scripts/lock.sh): \`pip install -e '.[dev,bench]'\` in a fresh"
  echo "# virtual environment, then \`pip freeze --all --exclude-editable\` less pip itself, for"
  echo "# $platform."
  echo "# torch is written without its +cpu label: the CPU wheel is the one pip finds first here."
  echo "# \`make install\` installs exactly these (--no-deps), then tinyserve itself; edit"
  echo "# pyproject.toml, then run \`make lock\`, never this file by hand."
  # --all: setuptools too, since torch requires a newer one than a new venv has.
  "${pip[@]}" freeze --all --exclude-editable | grep -v '^pip==' \
    | sed -E 's/^(torch==[^+]+)\+cpu$/\1/' | LC_ALL=C sort -f
} > "$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "wrote $LOCK: $(grep -vc '^#' "$LOCK") packages for $platform"

# The converter environment of `tinyserve convert litert` (requirements-litert.in), locked
# the same way in a venv of its own.
LITERT_LOCK=${LITERT_LOCK:-requirements-litert.lock}
"$PYTHON" -m venv "$tmp/litert"
litert=("$tmp/litert/bin/python" -m pip --disable-pip-version-check)
"${litert[@]}" install --quiet -r requirements-litert.in
"${litert[@]}" check
{
  echo "# Every package of the converter environment (requirements-litert.in), pinned, for"
  echo "# $platform. Written by \`make lock\`; \`make litert-env\` installs exactly these."
  "${litert[@]}" freeze --all | grep -v '^pip==' \
    | sed -E 's/^(torch==[^+]+)\+cpu$/\1/' | LC_ALL=C sort -f
} > "$LITERT_LOCK.tmp"
mv "$LITERT_LOCK.tmp" "$LITERT_LOCK"
echo "wrote $LITERT_LOCK: $(grep -vc '^#' "$LITERT_LOCK") packages"
