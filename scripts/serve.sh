#!/usr/bin/env bash
# Serve the app on http://127.0.0.1:8000 until Ctrl-C, then tear down what this
# script started: the Ray cluster if it started one, else the app.
# An argument serves another import path the same way (the benchmark's
# walkthrough-style baseline: scripts/serve.sh bench.baseline_app:app).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ray_env.sh
export PATH="$PWD/.venv/bin:$PATH"

cleanup() {
  trap '' INT TERM HUP  # a second Ctrl-C must not cut the teardown short
  echo "Stopping..."
  if [ "$started_cluster" = 1 ]; then
    # The app goes with the cluster. No `serve delete` first: a hangup or a
    # SIGTERM to this process group stops the raylet too, and a driver then
    # waits on a node that is gone.
    ray stop >/dev/null 2>&1 || true
    echo "Stopped: the Ray cluster this started, and the app RayServeLLM with it."
  else
    serve delete RayServeLLM >/dev/null 2>&1 || true
    echo "Stopped: app RayServeLLM deleted; the Ray cluster it joined runs on."
  fi
}

# A bad variable, or a port another program holds, is named before anything starts.
started_cluster=0
if ray status >/dev/null 2>&1; then
  python -m helpers.serve.preflight
  trap cleanup EXIT
else
  python -m helpers.serve.preflight --new-cluster
  # Metrics for Prometheus on 8080, or a free port where 8080 is taken (README: "Metrics").
  metrics_port="$(python -c 'from helpers.notebook.cluster import metrics_export_port as p; print(p())')"
  started_cluster=1  # from here on, even a Ctrl-C during `ray start` stops what it started
  trap cleanup EXIT
  ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --metrics-export-port="$metrics_port"
  echo "Metrics for Prometheus: http://127.0.0.1:$metrics_port/metrics"
fi

serve run "${1:-ray_serve_app:deployment_graph}"
