"""The KubeRay manifests serve the same application as deploy/serve_config.yaml."""

from pathlib import Path

import yaml

from helpers.config import APP_NAME, VARIABLES
from helpers.serve.config_file import NOT_IN_FILE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GPU_SETTINGS = {"NUM_GPUS_PER_REPLICA": "1"}  # the GPU worker group is why the manifest exists


def load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def serve_application() -> dict:
    (application,) = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"]
    return application


def rayservice() -> dict:
    (manifest,) = load(DEPLOY / "kuberay" / "rayservice.yaml")
    return manifest


def test_the_rayservice_serves_the_same_application() -> None:
    manifest = rayservice()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    expected = serve_application()
    assert application["name"] == APP_NAME == expected["name"]
    assert application["import_path"] == expected["import_path"]
    assert application["route_prefix"] == expected["route_prefix"]
    assert application["deployments"] == expected["deployments"]


def test_the_configmap_holds_the_serve_configs_variables() -> None:
    (configmap,) = load(DEPLOY / "kuberay" / "configmap.yaml")
    assert configmap["kind"] == "ConfigMap"
    variables = serve_application()["runtime_env"]["env_vars"]
    assert configmap["data"] == {**variables, **GPU_SETTINGS}
    assert set(configmap["data"]) == {v.name for v in VARIABLES} - NOT_IN_FILE


def test_every_pod_reads_the_configmap_and_the_gpu_group_starts_at_zero() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"] == {"mode": "token"}, "Ray's token auth, as on one machine"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 and workers["maxReplicas"] >= 1
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    pods = [cluster["headGroupSpec"]["template"], workers["template"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert {"configMapRef": {"name": "ray-serve-llm-config"}} in container["envFrom"]


def test_the_api_key_comes_from_a_secret_never_the_configmap() -> None:
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    (api_key,) = [e for e in container["env"] if e["name"] == "API_KEY"]
    assert api_key["valueFrom"]["secretKeyRef"]["name"] == "ray-serve-llm-api-key"
