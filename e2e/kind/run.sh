#!/usr/bin/env bash
# kind end-to-end suite: a real Kubernetes (kind) cluster, both images built
# and loaded, the operator installed with Helm, the sample cluster applied,
# then: a client Job writes and verifies under disruption (pod deletion,
# scale 3 -> 5 -> 3, rolling update); no acknowledged write may be lost.
#
# Needs docker, kind, kubectl and helm. Run from the repository root:
#   bash e2e/kind/run.sh            (KEEP=1 keeps the kind cluster)
set -euo pipefail

for tool in docker kind kubectl helm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "kind e2e suite SKIPPED: '$tool' is not installed (needs docker, kind, kubectl, helm)" >&2
    exit 2
  fi
done
if ! docker info >/dev/null 2>&1; then
  echo "kind e2e suite SKIPPED: no Docker engine is running" >&2
  exit 2
fi

CLUSTER=${CLUSTER:-distcache-e2e}
TAG=e2e-$(date +%s)
NS=caches
cd "$(dirname "$0")/../.."

step() { echo "=== $*"; }
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step "kind cluster"
kind create cluster --name "$CLUSTER" --wait 180s

step "images"
docker build --target node -t distcache/node:"$TAG" .
docker build --target operator -t distcache/operator:"$TAG" .
kind load docker-image --name "$CLUSTER" distcache/node:"$TAG" distcache/operator:"$TAG"

step "operator (helm install)"
helm install distcache-operator charts/distcache-operator \
  --namespace distcache-system --create-namespace \
  --set image.repository=distcache/operator --set image.tag="$TAG" \
  --set image.pullPolicy=Never --set replicaCount=2 --wait --timeout 180s

step "sample cluster"
kubectl create namespace "$NS"
sed -e "s#image: .*#image: distcache/node:$TAG#" examples/distcache-cluster.yaml \
  | kubectl apply -n "$NS" -f -
kubectl patch -n "$NS" dcc sample --type merge -p '{"spec":{"resources":null}}' || true
kubectl wait -n "$NS" dcc/sample --for=condition=Ready --timeout=300s
kubectl get -n "$NS" dcc sample -o wide

step "client job: writes for 240 s, then reads every acknowledged key back"
kubectl apply -n "$NS" -f - <<JOB
apiVersion: batch/v1
kind: Job
metadata:
  name: writer
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: writer
          image: distcache/node:$TAG
          imagePullPolicy: Never
          env:
            - name: DISTCACHE_ENDPOINTS
              value: sample.$NS.svc:7100
          command: ["/usr/local/bin/distcache", "verify", "--seconds", "240", "--keys", "2000"]
JOB

wait_ready() {
  kubectl wait -n "$NS" dcc/sample --for=jsonpath='{.status.safe}'=true --timeout=300s
  kubectl wait -n "$NS" dcc/sample --for=condition=Ready --timeout=300s
}

sleep 20
step "delete a pod"
kubectl delete pod -n "$NS" sample-1 --wait=false
sleep 5; wait_ready

step "scale to 5"
kubectl patch -n "$NS" dcc sample --type merge -p '{"spec":{"replicas":5}}'
sleep 5; wait_ready

step "scale to 3"
kubectl patch -n "$NS" dcc sample --type merge -p '{"spec":{"replicas":3}}'
sleep 5; wait_ready

step "rolling update"
kubectl patch -n "$NS" dcc sample --type merge -p '{"spec":{"failureDetectionTimeoutMs":4000}}'
kubectl rollout status -n "$NS" statefulset/sample --timeout=600s
wait_ready

step "writer verdict"
kubectl wait -n "$NS" job/writer --for=condition=complete --timeout=600s || {
  kubectl logs -n "$NS" job/writer | tail -50
  echo "kind e2e FAILED: the writer found lost writes or could not finish" >&2
  exit 1
}
kubectl logs -n "$NS" job/writer | tail -5

step "uninstall"
kubectl delete -n "$NS" dcc sample --wait=true --timeout=180s
helm uninstall distcache-operator -n distcache-system
echo "kind e2e suite PASSED"
