#!/usr/bin/env bash
# Build, roll out, wait until ready, smoke-test with a real prediction, roll back on failure.
#   deploy/deploy.sh [--target compose|k8s|k8s-blue-green] [--tag TAG] [--replicas N]
#                    [--registry REGISTRY] [--namespace NS] [--wait-s SECONDS] [--dry-run]
#   deploy/deploy.sh --check URL     wait for URL's readiness and smoke-test it, nothing else
# --dry-run prints every command (with a leading "+") instead of running it.
#   compose         deploy/compose/compose.yaml: N replicas behind nginx on 127.0.0.1:8080;
#                   rollback: the image that ran before, kept as tinyserve:previous.
#   k8s             deploy/k8s/overlays/production; rollback: kubectl rollout undo.
#   k8s-blue-green  deploy/k8s/overlays/blue-green: the idle color gets the new image and is
#                   smoke-tested on its own Service, then the live Service switches to it;
#                   rollback: the Service switches back (the old color never stopped).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=compose tag=$(date +%Y%m%d%H%M%S) replicas=3 registry=ghcr.io/example
namespace=tinyserve wait_s=120 dry_run=0 check_url=""
sample="$root/samples/fashion/0000_ankle-boot.png" model=fashion-cnn expected="Ankle boot"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --target) target=$2; shift ;;
    --tag) tag=$2; shift ;;
    --replicas) replicas=$2; shift ;;
    --registry) registry=$2; shift ;;
    --namespace) namespace=$2; shift ;;
    --wait-s) wait_s=$2; shift ;;
    --check) check_url=$2; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
  shift
done

run() {  # print, and unless --dry-run, run
  echo "+ $*"
  [ "$dry_run" -eq 1 ] || "$@"
}

wait_ready() {  # URL: poll /health/ready until it answers 200 or wait_s runs out
  local url=$1 deadline=$((SECONDS + wait_s))
  echo "+ wait for $url/health/ready (up to ${wait_s}s)"
  [ "$dry_run" -eq 1 ] && return 0
  until curl -fsS -o /dev/null --max-time 2 "$url/health/ready"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "not ready after ${wait_s}s: $url" >&2
      return 1
    fi
    sleep 1
  done
}

smoke() {  # URL: one real prediction of the bundled sample must name its class
  local url=$1 answer
  echo "+ curl -fsS --data-binary @$sample -H 'content-type: image/png' $url/v1/models/$model/predict"
  [ "$dry_run" -eq 1 ] && return 0
  answer=$(curl -fsS --max-time 10 --data-binary "@$sample" -H "content-type: image/png" \
    "$url/v1/models/$model/predict") || { echo "smoke test: the request failed" >&2; return 1; }
  case $answer in
    *"\"label\":\"$expected\""*|*"\"label\": \"$expected\""*) echo "smoke test passed: $expected" ;;
    *) echo "smoke test: unexpected answer: $answer" >&2; return 1 ;;
  esac
}

check() { wait_ready "$1" && smoke "$1"; }

if [ -n "$check_url" ]; then
  check "${check_url%/}"
  exit
fi

deploy_compose() {
  local compose=(docker compose -f "$root/deploy/compose/compose.yaml") url=http://127.0.0.1:8080
  run docker build -f "$root/deploy/docker/Dockerfile" -t "tinyserve:$tag" "$root"
  if [ "$dry_run" -eq 1 ] || docker image inspect tinyserve:current >/dev/null 2>&1; then
    run docker tag tinyserve:current tinyserve:previous
  fi
  run docker tag "tinyserve:$tag" tinyserve:current
  run env TINYSERVE_IMAGE=tinyserve:current "${compose[@]}" up -d --no-build --wait \
    --scale "tinyserve=$replicas"
  run "${compose[@]}" exec nginx nginx -s reload  # pick up the replicas' addresses
  if check "$url"; then on_failure rollback_compose; return 0; fi
  rollback_compose
  return 1
}

rollback_compose() {
  local compose=(docker compose -f "$root/deploy/compose/compose.yaml")
  echo "rolling back to tinyserve:previous" >&2
  run docker tag tinyserve:previous tinyserve:current
  run env TINYSERVE_IMAGE=tinyserve:current "${compose[@]}" up -d --no-build --wait \
    --scale "tinyserve=$replicas"
  run "${compose[@]}" exec nginx nginx -s reload
}

port_forward() {  # SERVICE PORT: forward localhost:PORT to the Service for the checks
  echo "+ kubectl -n $namespace port-forward service/$1 $2:80 &"
  forwarder=""
  [ "$dry_run" -eq 1 ] && return 0
  kubectl -n "$namespace" port-forward "service/$1" "$2:80" >/dev/null &
  forwarder=$!
  sleep 2
}

stop_forward() { [ -z "$forwarder" ] || kill "$forwarder" 2>/dev/null || true; }

on_failure() {  # the dry run also shows what a failed check would run
  [ "$dry_run" -eq 1 ] && echo "# if a check fails:" && "$@"
  return 0
}

build_push() {
  image="$registry/tinyserve:$tag"
  run docker build -f "$root/deploy/docker/Dockerfile" -t "$image" "$root"
  run docker push "$image"
}

deploy_k8s() {
  build_push
  run kubectl apply -k "$root/deploy/k8s/overlays/production"
  run kubectl -n "$namespace" set image deployment/tinyserve "tinyserve=$image" \
    "pull-models=$image"
  if run kubectl -n "$namespace" rollout status deployment/tinyserve --timeout "${wait_s}s"; then
    port_forward tinyserve 18080
    if check http://127.0.0.1:18080; then stop_forward; on_failure rollback_k8s; return 0; fi
    stop_forward
  fi
  rollback_k8s
  return 1
}

rollback_k8s() {
  echo "rolling back deployment/tinyserve" >&2
  run kubectl -n "$namespace" rollout undo deployment/tinyserve
  run kubectl -n "$namespace" rollout status deployment/tinyserve --timeout "${wait_s}s"
}

switch_to() {  # COLOR: point the live Service at it
  run kubectl -n "$namespace" patch service tinyserve --type merge -p \
    "{\"spec\":{\"selector\":{\"color\":\"$1\"}},\"metadata\":{\"annotations\":{\"tinyserve.dev/live-color\":\"$1\"}}}"
}

deploy_blue_green() {
  local live idle
  if [ "$dry_run" -eq 1 ]; then
    live=blue
    echo "+ kubectl -n $namespace get service tinyserve -o jsonpath={.spec.selector.color}"
  else
    live=$(kubectl -n "$namespace" get service tinyserve -o jsonpath='{.spec.selector.color}')
  fi
  idle=$([ "$live" = blue ] && echo green || echo blue)
  echo "live color: $live; deploying to $idle"
  build_push
  run kubectl -n "$namespace" set image "deployment/tinyserve-$idle" "tinyserve=$image" \
    "pull-models=$image"
  run kubectl -n "$namespace" rollout status "deployment/tinyserve-$idle" --timeout "${wait_s}s"
  port_forward "tinyserve-$idle" 18081
  if ! check http://127.0.0.1:18081; then
    stop_forward
    echo "$idle failed its smoke test; $live keeps serving" >&2
    run kubectl -n "$namespace" rollout undo "deployment/tinyserve-$idle"
    return 1
  fi
  stop_forward
  switch_to "$idle"
  port_forward tinyserve 18080
  if check http://127.0.0.1:18080; then stop_forward; on_failure switch_back "$live"; return 0; fi
  stop_forward
  switch_back "$live"
  return 1
}

switch_back() {
  echo "switching back to $1" >&2
  switch_to "$1"
}

case $target in
  compose) deploy_compose ;;
  k8s) deploy_k8s ;;
  k8s-blue-green) deploy_blue_green ;;
  *) echo "unknown --target $target (compose, k8s or k8s-blue-green)" >&2; exit 2 ;;
esac
echo "deployed $tag ($target)"
