#!/usr/bin/env bash
# Serve the bundled model, classify the bundled samples through the server, keep serving.
# ONCE=1 stops the server after the samples have been classified.
set -euo pipefail
bin=${VENV:-.venv}/bin
host=${HOST:-127.0.0.1}
port=${PORT:-8000}
url="http://$host:$port"

"$bin/tinyserve" serve --repo models --host "$host" --port "$port" --log-level warning &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 300); do
  if "$bin/python" -c "import httpx,sys; sys.exit(httpx.get('$url/health/ready').status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 $server 2>/dev/null || { echo "the server failed to start" >&2; exit 1; }
  sleep 0.1
done

echo "tinyserve is serving models/ at $url (API: $url/docs)"
"$bin/tinyserve" predict "$url" samples/fashion
echo
echo "try: curl --data-binary @samples/fashion/0000_ankle-boot.png $url/predict"
if [ "${ONCE:-0}" = "1" ]; then
  exit 0
fi
echo "press Ctrl-C to stop"
wait $server
