#!/usr/bin/env bash
# Install the Debian packages tinyserve's data, tests and tools use, where any is missing:
#   dataset-fashion-mnist  the real training and test data (/usr/share/datasets/fashion-mnist)
#   chromium               the headless browser of the web page's tests
#   redis-server           the Redis cache backend's tests (started on loopback by the suite)
#   prometheus             promtool, which checks and unit-tests the alert rules
#   nginx-light            the compose file's load balancer config (nginx -t)
#   shellcheck             deploy/deploy.sh's lint
#   wrk                    the overload measurements of make reliability
# Without apt-get, or without root and sudo, it says what is missing and carries on: the
# tests that need a missing program skip with that reason.
set -euo pipefail
data=${TINYSERVE_DATA_DIR:-/usr/share/datasets/fashion-mnist}
missing=()
if [ ! -f "$data/t10k-images-idx3-ubyte.gz" ] && [ ! -f "$data/t10k-images-idx3-ubyte" ]; then
  missing+=(dataset-fashion-mnist)
fi
for pair in chromium:chromium redis-server:redis-server promtool:prometheus \
            nginx:nginx-light shellcheck:shellcheck wrk:wrk; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
    || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing Debian packages, and apt-get is not available: ${missing[*]}." \
       "The tests that need them will be skipped." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "missing Debian packages, and installing them needs root:" \
         "apt-get install -y ${missing[*]}" >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
