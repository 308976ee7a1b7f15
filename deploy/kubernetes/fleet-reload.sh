#!/bin/sh
# Fleet reload: run `aeterna reload` in each pod of a Deployment, one pod at a time, and stop at the first pod
# whose reload does not end in a promotion. The pods not reached yet keep their current generation; the pods
# already reloaded keep their new one (once the cause is fixed, run the script again: reloading a pod twice is
# harmless, it just starts one more generation).
#
#   deploy/kubernetes/fleet-reload.sh [-n NAMESPACE] [-l SELECTOR] [-c CONTAINER] [--context CONTEXT]
#
# Defaults: the current namespace, -l app.kubernetes.io/name=aeterna-demo, -c aeterna. Only Running pods are
# reloaded, in name order. `kubectl exec` exits with the remote command's code, so this script exits with the
# failing pod's `aeterna reload` exit code:
#   0  every pod promoted its new generation
#   1  a reload was rolled back or failed (reason and code on stderr; the pod keeps serving its old generation),
#      or kubectl itself failed (no such pod, no access)
#   3  no daemon answers on the pod's control socket (is Aeterna the entrypoint?)
#   4  a reload is already in progress in that pod
#   2  usage error, or no pod matched
set -u

namespace=""
selector="app.kubernetes.io/name=aeterna-demo"
container="aeterna"
context=""

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -n | --namespace) [ $# -ge 2 ] || usage; namespace="$2"; shift 2 ;;
    -l | --selector) [ $# -ge 2 ] || usage; selector="$2"; shift 2 ;;
    -c | --container) [ $# -ge 2 ] || usage; container="$2"; shift 2 ;;
    --context) [ $# -ge 2 ] || usage; context="$2"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "fleet-reload: unknown argument: $1" >&2; usage ;;
  esac
done

# kubectl with the chosen context and namespace.
k() {
  if [ -n "$context" ] && [ -n "$namespace" ]; then kubectl --context "$context" -n "$namespace" "$@"
  elif [ -n "$context" ]; then kubectl --context "$context" "$@"
  elif [ -n "$namespace" ]; then kubectl -n "$namespace" "$@"
  else kubectl "$@"
  fi
}

if ! pods=$(k get pods -l "$selector" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'); then
  echo "fleet-reload: kubectl get pods -l $selector failed" >&2
  exit 1
fi
pods=$(printf '%s\n' "$pods" | sed '/^$/d' | LC_ALL=C sort)
if [ -z "$pods" ]; then
  echo "fleet-reload: no Running pod matches -l $selector${namespace:+ in namespace $namespace}" >&2
  exit 2
fi

total=$(printf '%s\n' "$pods" | wc -l | tr -d ' ')
i=0
for pod in $pods; do
  i=$((i + 1))
  echo "fleet-reload: [$i/$total] $pod: aeterna reload"
  k exec "$pod" -c "$container" -- aeterna reload
  code=$?
  if [ "$code" -ne 0 ]; then
    case "$code" in
      1) why="the reload was rolled back or failed (or kubectl failed); the pod keeps serving its previous generation" ;;
      3) why="no Aeterna daemon answers in the pod" ;;
      4) why="a reload is already in progress in the pod" ;;
      *) why="aeterna reload exited with code $code" ;;
    esac
    remaining=$((total - i))
    echo "fleet-reload: STOPPED at $pod [$i/$total], exit code $code: $why." >&2
    echo "fleet-reload: $((i - 1)) pod(s) reloaded before it; $remaining pod(s) not touched." >&2
    exit "$code"
  fi
done
echo "fleet-reload: all $total pod(s) promoted"
