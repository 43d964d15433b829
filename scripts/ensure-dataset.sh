#!/usr/bin/env bash
# Make sure Debian's Fashion-MNIST IDX files are installed; install them with apt if not.
set -euo pipefail
dir=${TINYSERVE_DATA_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$dir/t10k-images-idx3-ubyte.gz" ] || [ -f "$dir/t10k-images-idx3-ubyte" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST is missing from $dir and apt-get is not available: tests that need it" \
       "will be skipped. Install the IDX files there or set TINYSERVE_DATA_DIR." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "Fashion-MNIST is missing and installing it needs root:" \
         "apt-get install -y dataset-fashion-mnist" >&2
    exit 0
  fi
fi
echo "installing Debian's dataset-fashion-mnist ..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
