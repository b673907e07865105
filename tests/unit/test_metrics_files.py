"""What Prometheus, Grafana and a Prometheus operator are given names the
metrics the kit really exports, on the port the kit really opens."""

import json
import re
import socket
from pathlib import Path

import yaml

from helpers.notebook.cluster import METRICS_EXPORT_PORT, metrics_export_port
from helpers.serve import llm_metrics
from helpers.serve.llm_metrics import IngressMetrics, ReplicaMetrics

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def exported_names() -> set[str]:
    """Every metric the kit defines, as Prometheus shows it (Ray adds ``ray_``)."""
    metrics = [*vars(IngressMetrics()).values(), *vars(ReplicaMetrics()).values()]
    return {f"ray_{m._name}" for m in metrics if hasattr(m, "_name")}


def base_name(sample: str) -> str:
    for suffix in SUFFIXES:
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def test_the_grafana_dashboard_plots_only_metrics_the_kit_exports() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "llm-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {base_name(name) for e in expressions for name in re.findall(r"ray_llm_\w+", e)}
    assert used, "the dashboard plots none of the kit's metrics"
    assert used <= exported_names(), used - exported_names()
    assert exported_names() - used == set(), "a metric the dashboard leaves out"


def test_a_count_each_replica_makes_once_is_never_read_as_a_rate() -> None:
    """A replica records its cold start once, so its series is 1 from its
    first sample: rate() and increase() of it are 0. The dashboard counts
    the replicas' series instead, and shows Serve's proxy's own refusals,
    which never reach the kit's counters."""
    dashboard = json.loads((REPO / "deploy" / "grafana" / "llm-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    cold = [e for e in expressions if "ray_llm_cold_start" in e]
    assert cold and not [e for e in cold if re.search(r"(rate|increase)\(ray_llm_cold_start", e)]
    assert any("ray_serve_num_http_requests_total" in e for e in expressions)


def test_the_readme_scrape_config_targets_the_port_ray_is_started_with() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("scrape_configs:")[1].split("```")[0]
    config = yaml.safe_load("scrape_configs:" + block)
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_EXPORT_PORT}"]
    serve_script = (REPO / "scripts" / "serve.sh").read_text()
    assert "metrics_export_port" in serve_script
    assert '--metrics-export-port="$metrics_port"' in serve_script


def test_the_metrics_port_is_8080_unless_something_holds_it() -> None:
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", METRICS_EXPORT_PORT))
            was_free = True
        except OSError:  # a cluster of the user's, say
            was_free = False
        other = metrics_export_port()
        assert other != METRICS_EXPORT_PORT
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", other))  # free, as promised
    if was_free:
        assert metrics_export_port() == METRICS_EXPORT_PORT


def test_kuberay_exposes_the_metrics_port_to_a_prometheus_operator() -> None:
    (service,) = yaml.safe_load_all((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_EXPORT_PORT)
        (container,) = group["template"]["spec"]["containers"]
        assert {"containerPort": METRICS_EXPORT_PORT, "name": "metrics"} in container["ports"]
    (monitor,) = yaml.safe_load_all((REPO / "deploy" / "kuberay" / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}


def readme_metrics_rows() -> dict[str, str]:
    """The README's metrics table: each row's first cell, and the row whole."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Metrics and request ids")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {row.split("|")[1]: row for row in rows}


def test_the_readme_lists_every_outcome_the_requests_counter_takes() -> None:
    (row,) = [row for cell, row in readme_metrics_rows().items() if "requests_total" in cell]
    listed = set(re.findall(r"\b[a-z]+(?:_[a-z]+)*\b", row.split("|")[3]))
    assert set(llm_metrics.OUTCOMES) <= listed, set(llm_metrics.OUTCOMES) - listed


def test_the_readme_says_sampled_only_of_the_gauges_that_are() -> None:
    """The gauges a replica's sampling thread sets, and only those, are
    called sampled: every gauge, since Ray stops exporting one left unchanged
    (``requests_running`` is also set as requests start and end)."""
    replica = ReplicaMetrics()
    gauges = {name: g for name, g in vars(replica).items() if hasattr(g, "_name")}
    set_by_sampling = set()
    for name, gauge in gauges.items():
        if type(gauge).__name__ == "Gauge":
            gauge.set = lambda *_, name=name, **__: set_by_sampling.add(name)
        elif hasattr(gauge, "inc"):
            gauge.inc = lambda *_, **__: None
    replica.sample_batch(1, 2, 3, 0)
    sampled = {
        name
        for cell, row in readme_metrics_rows().items()
        if "sampled" in row
        for name in re.findall(r"`(\w+)`", cell)
    }
    assert sampled == {gauges[name]._name.removeprefix("llm_") for name in set_by_sampling}
    every_gauge = {name for name, gauge in gauges.items() if type(gauge).__name__ == "Gauge"}
    assert set_by_sampling == every_gauge, every_gauge - set_by_sampling
