#!/usr/bin/env bash
# Full-cluster end-to-end test on kind (needs Docker or another engine kind supports; these development
# machines have none, so this runs on developer laptops and CI hosts with Docker).
#   create a kind cluster → build and load both images → helm install → Redis + the example StreamQueue
#   → push a backlog → assert scale-out → let it drain → assert scale-in → delete the cluster.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/.tools/bin:$PATH"
VERSION="$(cat VERSION)"
CLUSTER="${KIND_CLUSTER:-streamqueue-e2e}"
NS=default
MESSAGES="${E2E_MESSAGES:-20000}"
log() { printf '[e2e-kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e-kind needs $tool (run \`make tools\` for kind/helm/kubectl)" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e-kind needs a running container engine (docker info failed)" >&2; exit 2; }

cleanup() { [ "${KEEP_CLUSTER:-0}" = 1 ] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
log "building images $VERSION"
make images IMAGE_REPO=streamqueue VERSION="$VERSION"
kind load docker-image --name "$CLUSTER" "streamqueue/operator:$VERSION" "streamqueue/worker:$VERSION"

log "helm install"
helm install streamqueue charts/streamqueue-operator --namespace streamqueue-system --create-namespace --wait --timeout 120s
kubectl -n "$NS" apply -f hack/e2e/redis.yaml
kubectl -n "$NS" rollout status deploy/redis --timeout 120s
kubectl -n "$NS" apply -f examples/streamqueue-secret-tls.yaml --dry-run=server >/dev/null
kubectl -n "$NS" apply -f hack/e2e/streamqueue.yaml

replicas() { kubectl -n "$NS" get deploy -l streamqueue.io/queue=e2e -o jsonpath='{.items[0].spec.replicas}' 2>/dev/null || echo 0; }
wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...
  local what="$1" limit="$2"; shift 2
  for _ in $(seq "$limit"); do if "$@"; then log "ok: $what"; return 0; fi; sleep 1; done
  kubectl -n "$NS" describe streamqueue e2e >&2 || true
  echo "timed out waiting for: $what" >&2; return 1
}

log "pushing $MESSAGES messages from 20 users"
kubectl -n "$NS" run e2e-load --rm -i --restart=Never --image="streamqueue/worker:$VERSION" \
  --overrides='{"spec":{"containers":[{"name":"e2e-load","image":"streamqueue/worker:'"$VERSION"'","command":["python","-c","import os,redis; r=redis.Redis(host=\"redis\",password=os.environ[\"P\"]); p=r.pipeline(transaction=False)\nfor i in range('"$MESSAGES"'): p.xadd(\"user_messages_queue\",{\"user_id\":f\"user{i%20}\",\"message\":f\"m{i}\",\"timestamp\":\"0\"})\np.execute()"],"env":[{"name":"P","valueFrom":{"secretKeyRef":{"name":"redis-auth","key":"password"}}}]}]}}' 

wait_for "scaled out above 1 replica" 60 bash -c '[ "$(kubectl -n '"$NS"' get deploy -l streamqueue.io/queue=e2e -o jsonpath="{.items[0].spec.replicas}")" -gt 1 ]'
wait_for "backlog drained" 300 bash -c '[ "$(kubectl -n '"$NS"' get streamqueue e2e -o jsonpath="{.status.backlog}")" = 0 ]'
wait_for "scaled back in to minReplicas" 180 bash -c '[ "$(kubectl -n '"$NS"' get deploy -l streamqueue.io/queue=e2e -o jsonpath="{.items[0].spec.replicas}")" -le 1 ]'
kubectl -n "$NS" get streamqueues
log "e2e-kind passed"
