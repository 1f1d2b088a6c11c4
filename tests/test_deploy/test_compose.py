"""Static checks of the Docker deployment files (Docker itself is not needed).

Covers docker-compose.kafka.yml, Dockerfile, .dockerignore and deploy/config.docker.yaml.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.kafka.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG = ROOT / "deploy" / "config.docker.yaml"

CONFIG_PATH_IN_IMAGE = "/etc/emarsys-stream/config.yaml"
DATA_DIR = "/var/lib/emarsys-stream"

# "${VAR}", "${VAR:?message}", "${VAR?message}", "${VAR:-default}" (compose interpolation)
ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[?-][^}]*)?\}$")
SECRET_KEY = re.compile(r"secret|password|passwd|token|api_?key|username", re.IGNORECASE)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict)
    return svcs


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """Compose `environment` as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str] = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def published_host_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if "published" in entry:
                ports.add(int(entry["published"]))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry!r} is not published to a host port"
        ports.add(int(parts[-2]))
    return ports


def container_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].split(":")[-1]))
    return ports


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in value.split(","):
        name, _, rest = item.strip().partition("://")
        host, _, port = rest.rpartition(":")
        out[name] = (host, int(port))
    return out


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Volumes as (source, target, options) from short or long syntax."""
    out: list[tuple[str, str, str]] = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            opts = "ro" if entry.get("read_only") else ""
            out.append((str(entry.get("source", "")), str(entry["target"]), opts))
        else:
            parts = str(entry).split(":")
            source, target = parts[0], parts[1]
            out.append((source, target, parts[2] if len(parts) > 2 else ""))
    return out


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def dockerfile_instruction(name: str) -> list[str]:
    """Exec-form JSON args of the last `name` instruction in the final stage."""
    text = DOCKERFILE.read_text()
    found: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.upper().startswith("FROM "):
            found = None  # only the final stage counts
        if stripped.upper().startswith(name.upper() + " "):
            args = json.loads(stripped[len(name) + 1 :].strip())
            assert isinstance(args, list), f"{name} must use the exec (JSON) form"
            found = [str(a) for a in args]
    assert found is not None, f"no {name} in the final stage of the Dockerfile"
    return found


# --------------------------------------------------------------------------- compose


def test_services_exist(services: dict[str, Any]) -> None:
    assert "kafka" in services
    assert "worker" in services


def test_kafka_image_is_official_and_pinned(services: dict[str, Any]) -> None:
    image = services["kafka"]["image"]
    repo, sep, tag = image.partition(":")
    assert repo in {"apache/kafka", "docker.io/apache/kafka"}
    assert sep and tag and tag != "latest"
    assert re.fullmatch(r"(3\.9|4\.\d+)\.\d+", tag), f"pin a 3.9.x or 4.x tag, got {tag!r}"


def test_no_zookeeper_anywhere(compose: dict[str, Any]) -> None:
    # Comments may mention it ("no ZooKeeper"); the parsed config must not.
    assert "zookeeper" not in json.dumps(compose).lower()


def test_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    env = env_of(services["kafka"])
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert node_id.isdigit()

    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1
    voter_id, _, voter_addr = voters[0].partition("@")
    assert voter_id == node_id
    voter_host, _, voter_port = voter_addr.rpartition(":")

    ctrl_names = env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    lst = listeners(env["KAFKA_LISTENERS"])
    proto = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(lst) <= set(proto), "every listener needs a security protocol"
    assert ctrl_names[0] in lst
    assert lst[ctrl_names[0]][1] == int(voter_port)
    assert voter_host in {"kafka", "localhost", services["kafka"].get("hostname")}

    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert set(advertised) <= set(lst)
    assert not set(ctrl_names) & set(advertised), "controller listener must not be advertised"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised

    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        assert env[key] == "1", key


def test_kafka_has_healthcheck_and_data_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    kafka = services["kafka"]
    test = kafka["healthcheck"]["test"]
    cmd = " ".join(test) if isinstance(test, list) else str(test)
    assert re.search(r"kafka-(broker-api-versions|topics)\.sh", cmd)
    assert "localhost:9092" in cmd

    named = set(compose.get("volumes") or {})
    mounts = volume_mounts(kafka)
    data_mounts = [t for s, t, _ in mounts if s in named]
    assert data_mounts, "kafka needs a named volume for its data"
    log_dirs = env_of(kafka).get("KAFKA_LOG_DIRS")
    if log_dirs:
        assert all(d in data_mounts for d in log_dirs.split(","))


def test_host_and_internal_listeners_are_reachable(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    env = env_of(kafka)
    lst = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    # A listener advertised as localhost:<host port> must be the one published on that port.
    mapping: dict[int, int] = {}
    for entry in kafka.get("ports") or []:
        parts = str(entry).split("/")[0].split(":")
        mapping[int(parts[-2])] = int(parts[-1])
    host_side = [n for n, (h, _) in advertised.items() if h in {"localhost", "127.0.0.1"}]
    assert host_side, "no listener advertised for host clients"
    for name in host_side:
        host_port = advertised[name][1]
        assert mapping.get(host_port) == lst[name][1], (
            f"{name} advertised as localhost:{host_port} but that host port does not map to "
            f"container port {lst[name][1]}"
        )
    internal = [n for n, (h, _) in advertised.items() if h in {"kafka", kafka.get("hostname")}]
    assert internal, "no listener advertised on the compose service name"
    for name in internal:
        assert advertised[name][1] == lst[name][1]


def test_worker_depends_on_healthy_kafka(services: dict[str, Any]) -> None:
    depends = services["worker"]["depends_on"]
    assert isinstance(depends, dict), "use the long depends_on form with a condition"
    assert depends["kafka"]["condition"] == "service_healthy"


def test_worker_bootstrap_points_at_internal_listener(services: dict[str, Any]) -> None:
    env = env_of(services["worker"])
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    host, _, port = bootstrap.partition(":")
    assert host == "kafka"
    advertised = listeners(env_of(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"])
    assert (host, int(port)) in advertised.values()


def test_worker_build_and_restart(services: dict[str, Any]) -> None:
    worker = services["worker"]
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert worker["restart"] == "unless-stopped"


def test_worker_config_mount_matches_dockerfile_cmd(services: dict[str, Any]) -> None:
    cmd = dockerfile_instruction("CMD")
    config_path = cmd[cmd.index("--config") + 1]
    assert config_path == CONFIG_PATH_IN_IMAGE

    worker_cmd = services["worker"].get("command")
    if worker_cmd is not None:
        assert isinstance(worker_cmd, list)
        assert worker_cmd[worker_cmd.index("--config") + 1] == config_path

    mounts = {t: (s, o) for s, t, o in volume_mounts(services["worker"])}
    source, opts = mounts[config_path]
    assert (ROOT / source).resolve() == CONFIG
    assert CONFIG.is_file()
    assert "ro" in opts.split(",")


def test_worker_data_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    mounts = {t: s for s, t, _ in volume_mounts(services["worker"])}
    assert mounts.get(DATA_DIR) in named


def test_worker_secrets_come_from_env(services: dict[str, Any]) -> None:
    env = env_of(services["worker"])
    for key in ("EMARSYS_USERNAME", "EMARSYS_SECRET"):
        value = env[key]
        assert ENV_REF.match(value), f"{key} must be a ${{...}} reference, got {value!r}"
        assert value.startswith("${" + key)
    # Nothing that looks like a secret anywhere in the compose file is a literal.
    for name, service in services.items():
        for key, value in env_of(service).items():
            if SECRET_KEY.search(key):
                assert ENV_REF.match(value), f"{name}.environment.{key} is a literal secret"


def test_published_ports(services: dict[str, Any]) -> None:
    assert 9092 in published_host_ports(services["kafka"])
    assert 6066 in published_host_ports(services["worker"])
    assert 6066 in container_ports(services["worker"])


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_entrypoint_and_cmd() -> None:
    assert dockerfile_instruction("ENTRYPOINT") == ["emarsys-stream"]
    assert dockerfile_instruction("CMD") == ["worker", "--config", CONFIG_PATH_IN_IMAGE]


def test_dockerfile_basics() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    resolved = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), f) for f in froms
    ]
    assert resolved and all(f == "python:3.11-slim" for f in resolved), resolved
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the project must be pip-installed"
    assert re.search(r"^EXPOSE\s+6066\b", text, re.MULTILINE)
    assert re.search(r"^VOLUME\s+\[\"/var/lib/emarsys-stream\"\]", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert ".git" in patterns and ".venv" in patterns
    for needed in ("pyproject.toml", "README.md", "app", "deploy", "deploy/config.docker.yaml"):
        assert needed not in patterns
    assert "*.md" not in patterns and "deploy" not in patterns


# --------------------------------------------------------------------------- config


def test_config_keys(config: dict[str, Any]) -> None:
    kafka = config["kafka"]
    assert kafka["bootstrap_servers"] == "kafka:9092"
    assert kafka["ingest_topic"] == "segment.events"
    assert kafka["dead_letter_topic"] == "segment.events.dlq"
    assert kafka["partitions"] == 8

    emarsys = config["emarsys"]
    assert emarsys["api_url"] == "https://api.emarsys.net/api/v2/"
    assert emarsys["auth"] == {
        "type": "wsse",
        "username": "${EMARSYS_USERNAME}",
        "secret": "${EMARSYS_SECRET}",
    }

    pk = config["identity"]["primary_key"]
    assert pk["paths"] == ["traits.email", "context.traits.email", "properties.email"]
    assert pk["field_id"] == 3
    assert pk["normalize"] == ["trim", "lowercase"]

    by_field = {m["field_id"]: m for m in config["data_map"]}
    assert set(by_field) == {1, 2, 4, 31}
    expected_from = {1: "firstName", 2: "lastName", 31: "optIn", 4: "birthday"}
    for field_id, name in expected_from.items():
        sources = by_field[field_id]["from"]
        sources = [sources] if isinstance(sources, str) else sources
        assert sources and all(s.split(".")[-1] == name for s in sources), sources
    assert by_field[31]["transform"] == "optin"
    assert by_field[4]["transform"] == "date"

    assert config["web"] == {"host": "0.0.0.0", "port": 6066}
    assert config["store"] == "rocksdb://"
    assert config["data_dir"] == DATA_DIR


def test_config_has_no_literal_secret(config: dict[str, Any]) -> None:
    for path, value in leaves(config):
        if SECRET_KEY.search(path.rsplit(".", 1)[-1]):
            assert isinstance(value, str) and ENV_REF.match(value), (
                f"{path} must be a ${{VAR}} reference"
            )


def test_config_loads_with_app_settings(config: dict[str, Any]) -> None:
    """If app.settings exists, the docker config must validate against it."""
    settings_mod = pytest.importorskip("app.settings")
    env = {"EMARSYS_USERNAME": "user", "EMARSYS_SECRET": "s3cr3t"}
    settings = settings_mod.load_settings(CONFIG, env=env)
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.emarsys.auth.username == "user"
    assert settings.web.port == 6066
    assert settings.data_dir == DATA_DIR

    overridden = settings_mod.load_settings(
        CONFIG, env={**env, "KAFKA_BOOTSTRAP_SERVERS": "other:9093"}
    )
    assert overridden.kafka.bootstrap_servers == "other:9093"
