"""Static checks of the deployment files: compose, Dockerfiles, Ray Serve, Ray cluster and KubeRay configs.

Nothing is built or started; the files are parsed and checked against the settings and the code.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from services.catalog import SERVICES
from services.runtime.settings import DEFAULT_PORTS, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
DOCKERFILE_GPU = ROOT / "deploy/docker/Dockerfile.gpu"
SERVE = ROOT / "deploy/ray/serve.yaml"
CLUSTER = ROOT / "deploy/ray/cluster.yaml"
RAYSERVICE = ROOT / "deploy/k8s/rayservice.yaml"
APPLICATIONS = {
    "pipeline",
    "retriever-dense",
    "retriever-bm25",
    "retriever-colbert",
    "retriever-mamba",
    "retriever-seal",
    "reranker",
    "generator",
    "evaluator",
}


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def ragfleet_services() -> dict[str, dict]:
    return {name: spec for name, spec in compose_services().items() if name != "chroma"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def serve_config() -> dict:
    return yaml.safe_load(SERVE.read_text())


def rayservice() -> dict:
    return next(doc for doc in yaml.safe_load_all(RAYSERVICE.read_text()) if doc["kind"] == "RayService")


# docker-compose.yml


def test_compose_runs_the_services_that_exist_plus_chroma() -> None:
    assert set(compose_services()) == APPLICATIONS | {"chroma"}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_compose_service_serves_itself_on_its_default_port(name: str) -> None:
    spec = ragfleet_services()[name]
    assert spec["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (ROOT / spec["build"]["context"] / spec["build"]["dockerfile"]).is_file()
    command = spec["command"]
    assert command[:2] == ["serve", name] and command[2] == "--port" and len(command) == 4
    assert name in DEFAULT_PORTS
    port = int(command[3])
    assert port == DEFAULT_PORTS[name]
    assert spec["ports"] == [f"{port}:{port}"]
    env = spec["environment"]
    assert env["RAGFLEET_SERVER__HOST"] == "0.0.0.0"
    assert env["RAGFLEET_HOME"] == "/data"
    # The health check reads the port from RAGFLEET_SERVER__PORT.
    assert int(env["RAGFLEET_SERVER__PORT"]) == port
    assert "RAGFLEET_SERVER__PORT" in " ".join(spec["healthcheck"]["test"])


def test_every_service_gets_the_same_required_auth_settings() -> None:
    auth = {
        name: {key: value for key, value in spec["environment"].items() if key.startswith("RAGFLEET_AUTH__")}
        for name, spec in ragfleet_services().items()
    }
    shared = auth["pipeline"]
    assert all(settings == shared for settings in auth.values())
    # `docker compose` stops unless the tokens are set; running open is a second, explicit setting.
    assert shared["RAGFLEET_AUTH__TOKENS"].startswith("${RAGFLEET_AUTH__TOKENS:?")
    assert shared["RAGFLEET_AUTH__ALLOW_OPEN"] == "${RAGFLEET_AUTH__ALLOW_OPEN:-false}"


def test_every_stateful_service_has_its_own_named_volume() -> None:
    top = yaml.safe_load(COMPOSE.read_text())
    mounts = {}
    for name, spec in compose_services().items():
        (volume,) = spec["volumes"]
        source, target = volume.split(":")
        assert target == "/data"
        mounts[name] = source
    assert len(set(mounts.values())) == len(mounts)
    assert set(mounts.values()) == set(top["volumes"])


def test_pipeline_finds_the_retrievers_by_service_name() -> None:
    services = compose_services()
    raw = services["pipeline"]["environment"]["RAGFLEET_GATEWAY__RETRIEVERS"]
    gateway = GatewaySettings(retrievers=json.loads(raw))
    assert set(gateway.retrievers) == {"dense", "bm25", "colbert", "mamba", "seal"}
    for endpoint in gateway.retrievers.values():
        host, port = endpoint.address.rsplit(":", 1)
        assert host in services
        assert int(port) == DEFAULT_PORTS[host]
        assert services["pipeline"]["depends_on"][host] == {"condition": "service_healthy"}


def test_pipeline_finds_the_generator_and_the_generator_the_dense_retriever() -> None:
    services = compose_services()
    pipeline = services["pipeline"]
    generator = GatewaySettings(
        generator=json.loads(pipeline["environment"]["RAGFLEET_GATEWAY__GENERATOR"])
    ).generator
    assert generator is not None and generator.address == f"generator:{DEFAULT_PORTS['generator']}"
    assert pipeline["depends_on"]["generator"] == {"condition": "service_healthy"}
    retriever = services["generator"]["environment"]["RAGFLEET_GENERATOR__RETRIEVER__ADDRESS"]
    assert retriever == f"retriever-dense:{DEFAULT_PORTS['retriever-dense']}"
    assert services["generator"]["depends_on"]["retriever-dense"] == {"condition": "service_healthy"}


def test_pipeline_finds_the_reranker_in_compose_and_in_the_fleet() -> None:
    from services.runtime.serve import FLEET, fleet_settings
    from services.runtime.settings import Settings

    pipeline = compose_services()["pipeline"]
    reranker = GatewaySettings(
        reranker=json.loads(pipeline["environment"]["RAGFLEET_GATEWAY__RERANKER"])
    ).reranker
    assert reranker is not None and reranker.address == f"reranker:{DEFAULT_PORTS['reranker']}"
    assert pipeline["depends_on"]["reranker"] == {"condition": "service_healthy"}
    deployed = fleet_settings(Settings()).gateway.reranker
    assert deployed is not None and deployed.application == "reranker"
    assert FLEET.index("reranker") < FLEET.index("pipeline")
    assert SERVICES["reranker"].servicer_function.endswith("add_RerankerServicer_to_server")


def test_fleet_settings_route_generation_through_the_serve_proxy() -> None:
    from services.runtime.serve import fleet_settings
    from services.runtime.settings import Settings

    deployed = fleet_settings(Settings())
    proxy = f"127.0.0.1:{deployed.ray.grpc_port}"
    assert deployed.gateway.generator is not None
    assert (deployed.gateway.generator.address, deployed.gateway.generator.application) == (
        proxy,
        "generator",
    )
    assert (deployed.generator.retriever.address, deployed.generator.retriever.application) == (
        proxy,
        "retriever-dense",
    )


def test_ingest_skips_colbert_unless_asked_in_compose_and_in_the_fleet() -> None:
    from services.runtime.serve import fleet_settings
    from services.runtime.settings import Settings

    env = compose_services()["pipeline"]["environment"]
    compose = GatewaySettings(default_retrievers=json.loads(env["RAGFLEET_GATEWAY__DEFAULT_RETRIEVERS"]))
    deployed = fleet_settings(Settings())
    for gateway in (compose, deployed.gateway):
        assert gateway.default_retrievers == ["dense", "bm25"]
    assert set(deployed.gateway.retrievers) == {"dense", "bm25", "colbert", "mamba", "seal"}
    assert deployed.gateway.retrievers["colbert"].application == "retriever-colbert"
    assert deployed.gateway.retrievers["mamba"].application == "retriever-mamba"
    assert deployed.gateway.retrievers["seal"].application == "retriever-seal"


def test_dense_retriever_uses_the_chroma_service() -> None:
    services = compose_services()
    env = services["retriever-dense"]["environment"]
    assert env["RAGFLEET_RETRIEVER__CHROMA_HOST"] == "chroma"
    chroma_port = int(env["RAGFLEET_RETRIEVER__CHROMA_PORT"])
    assert services["chroma"]["ports"] == [f"127.0.0.1:{chroma_port}:{chroma_port}"]
    assert services["chroma"]["image"].startswith("chromadb/chroma:")
    assert f"/dev/tcp/127.0.0.1/{chroma_port}" in " ".join(services["chroma"]["healthcheck"]["test"])
    assert services["retriever-dense"]["depends_on"]["chroma"] == {"condition": "service_healthy"}


def test_compose_and_serve_names_are_services_the_cli_knows() -> None:
    assert set(ragfleet_services()) <= set(SERVICES)
    config = serve_config()
    assert {app["name"] for app in config["applications"]} <= set(SERVICES)
    assert sorted(config["grpc_options"]["grpc_servicer_functions"]) == sorted(
        {SERVICES[app["name"]].servicer_function for app in config["applications"]}
    )


# Dockerfiles


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_installs_the_project_and_runs_ragfleet(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoints] == [["ragfleet"]]
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install ./clients/python" in runs
    assert "torch==2.13.0" in runs
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(op == "HEALTHCHECK" and "grpc_health" in args for op, args in instructions)


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [shlex.split(args) for op, args in instructions if op == "RUN" and "torch==2.13.0" in args]
    assert runs and "https://download.pytorch.org/whl/cpu" in runs[0]
    assert any(op == "RUN" and '".[cpu]"' in args for op, args in instructions)


def test_gpu_image_is_cuda_based_with_the_gpu_extra() -> None:
    instructions = dockerfile_instructions(DOCKERFILE_GPU)
    base = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG")["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert any(op == "RUN" and '".[gpu]"' in args for op, args in instructions)


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_copies_only_existing_unignored_paths(path: Path) -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for op, args in dockerfile_instructions(path):
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies {source}, which does not exist"
                assert source.split("/")[0] not in ignored, f".dockerignore drops {source}"


# Ray Serve, the Ray cluster launcher, KubeRay


def test_serve_config_names_the_applications_and_servicers() -> None:
    config = serve_config()
    assert {app["name"] for app in config["applications"]} == APPLICATIONS
    assert config["grpc_options"]["port"] == 9000
    for function in config["grpc_options"]["grpc_servicer_functions"]:
        module, attribute = function.rsplit(".", 1)
        stub = ROOT / "clients/python" / (module.replace(".", "/") + ".py")
        assert f"def {attribute}(" in stub.read_text()


def test_serve_import_paths_build_the_named_applications() -> None:
    import importlib

    from ray.serve import Application

    from services.runtime.serve import FLEET

    assert {app["name"] for app in serve_config()["applications"]} == set(FLEET)
    for app in serve_config()["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        built = getattr(importlib.import_module(module), attribute)(app["args"])
        assert isinstance(built, Application)
        assert app["args"] == {"service": app["name"]}


def test_serve_applications_route_by_their_name() -> None:
    for app in serve_config()["applications"]:
        assert app["route_prefix"] == f"/{app['name']}"


def test_serve_config_matches_rays_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve_config())


def test_rayservice_carries_the_same_serve_config() -> None:
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config()


def test_rayservice_pods_expose_grpc_and_share_ragfleet_home() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        assert 9000 in {port["containerPort"] for port in container["ports"]}
        env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert env["RAGFLEET_HOME"] in mounts
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims[mounts[env["RAGFLEET_HOME"]]] == "ragfleet-data"


def test_every_pod_reads_the_fleets_tokens_from_one_secret() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        env = {item["name"]: item for item in container["env"]}
        secret = env["RAGFLEET_AUTH__TOKENS"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "ragfleet-auth", "key": "tokens"}


def test_every_cluster_node_reads_the_same_tokens() -> None:
    config = yaml.safe_load(CLUSTER.read_text())
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(command for command in commands if "ray start" in command)
        assert 'RAGFLEET_AUTH__TOKENS="$(cat /mnt/ragfleet/tokens.json)"' in start
        assert "--dashboard-host" not in start


def test_cluster_config_is_valid_for_the_ray_launcher() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load(CLUSTER.read_text())
    util.validate_config(util.prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "local"
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "./clients/python" in setup


# Auth and binding of the fleet on Ray


def test_every_deployment_gets_the_same_auth_settings() -> None:
    from services.runtime.serve import FLEET, application, fleet_settings
    from services.runtime.settings import AuthSettings, Settings

    deployed = fleet_settings(Settings(auth=AuthSettings(tokens={"s3cret": "acme"})))
    for name in FLEET:
        (settings,) = application(name, deployed)._bound_deployment.init_args
        assert settings["auth"] == {"tokens": {"s3cret": "acme"}, "allow_open": False}


@pytest.fixture
def serve_binds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ray Serve's two bind helpers, recording the address they are given (restored afterwards)."""
    from ray.serve._private import default_impl, replica

    import services.runtime.serve as serve_glue

    bound: list[str] = []
    monkeypatch.setattr(default_impl, "add_grpc_address", lambda server, address: bound.append(address))
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address))
    monkeypatch.setattr(serve_glue, "_serve_on_loopback", False)
    return bound


def test_the_setup_hook_keeps_serves_grpc_servers_on_loopback(serve_binds: list[str]) -> None:
    from ray._private.runtime_env.setup_hook import load_and_execute_setup_hook_module
    from ray.serve._private import default_impl, replica

    from services.runtime.serve import fleet_runtime_env
    from services.runtime.settings import RaySettings, Settings

    # What a Ray worker does with the hook of the job's runtime_env when it starts.
    hook = fleet_runtime_env(Settings())["worker_process_setup_hook"]
    assert load_and_execute_setup_hook_module(hook) is None
    default_impl.add_grpc_address(None, "[::]:9000")
    replica.add_port_to_grpc_server(None, "[::]:0")
    assert serve_binds == ["127.0.0.1:9000", "127.0.0.1:0"]
    assert fleet_runtime_env(Settings(ray=RaySettings(host="0.0.0.0"))) == {}


def test_a_replica_refuses_to_serve_open_unless_serve_is_kept_on_loopback(serve_binds: list[str]) -> None:
    from services.runtime.serve import keep_serve_on_loopback, refuse_open_replica
    from services.runtime.settings import AuthSettings, OpenServiceError, Settings

    with pytest.raises(OpenServiceError, match="retriever-bm25 .behind Serve's gRPC proxy. would listen on"):
        refuse_open_replica(Settings(), "retriever-bm25")
    refuse_open_replica(Settings(auth=AuthSettings(tokens={"s3cret": "acme"})), "retriever-bm25")
    refuse_open_replica(Settings(auth=AuthSettings(allow_open=True)), "retriever-bm25")
    keep_serve_on_loopback()
    refuse_open_replica(Settings(), "retriever-bm25")


def test_ragfleet_serve_binds_loopback_unless_told_otherwise() -> None:
    from typer.testing import CliRunner

    from services.cli import app
    from services.runtime.settings import Settings

    assert Settings().server.host == "127.0.0.1"
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "default: settings.server.host, 127.0.0.1" in result.output


def test_down_with_no_embedded_ray_running_says_so_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import subprocess

    from typer.testing import CliRunner

    import services.cli as cli
    from services.runtime.settings import get_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RAGFLEET_RAY__PORT", str(port))
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)  # down sets it; undone after
    ran: list[list[str]] = []

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    # `ray stop` would stop every Ray instance of this user on the machine.
    monkeypatch.setattr(subprocess, "run", run)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["down"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "no running Ray instance found" in result.output
    assert ran == [[cli._ray_bin(), "stop"]]
