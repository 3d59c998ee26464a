"""docker/compose.yaml describes a deployment that can start: checked without a Docker engine or network.

The file is interpolated the way Compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``)
and parsed with PyYAML; then: every service is there, every image is pinned (Kafka and the
registry at the versions the local launchers pin), every BEAMSTREAM_* name is a real setting
with a valid value, every Beamstream command parses. ``docker compose config`` runs too where
the Compose plugin is installed (it works offline, without an engine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from beamstream import cluster, registry
from beamstream.artifacts import load_lock
from beamstream.cli import build_parser
from beamstream.settings import ENV_PREFIX, Settings, load_settings

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
SECRETS = {"ISPYB_DB_PASSWORD": "test-password-not-used"}
#: Variables the environment may hold besides the settings themselves.
EXTRA_VARIABLES = {f"{ENV_PREFIX}SASL_PASSWORD_FILE", f"{ENV_PREFIX}CONFIG",
                   f"{ENV_PREFIX}LOCAL_KAFKA_ADMIN_PASSWORD_FILE"}
SERVICES = {"kafka", "topics", "schema-registry", "kafka-ui", "mariadb", "ispyb-schema", "worker",
            "ispyb-sink", "archiver", "gda-feedback"}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's variable substitution (the forms this project uses)."""
    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if environ.get(name):
            return environ[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return _VARIABLE.sub(substitute, text)


def load_compose(environ: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), SECRETS if environ is None else environ))


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def beamstream_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s["image"].startswith("beamstream:")}


def service_environment(service: dict) -> dict[str, str]:
    environ: dict[str, str] = {}
    for name in service.get("env_file", []):
        environ.update(env_file(DOCKER / name))
    environ.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return environ


def test_every_service_is_declared() -> None:
    compose = load_compose()
    assert SERVICES <= set(compose["services"])
    assert "dashboard" in COMPOSE.read_text()  # the placeholder, until the dashboard ships
    assert compose["services"]["worker"]["deploy"]["replicas"] >= 1
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def test_the_database_password_is_required_not_defaulted() -> None:
    with pytest.raises(KeyError, match="ISPYB_DB_PASSWORD"):
        load_compose({})


def test_images_are_pinned_at_the_launchers_versions() -> None:
    images = {name: s["image"] for name, s in load_compose()["services"].items()}
    for name, image in images.items():
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    kafka_version = next(a.version for a in load_lock(cluster.LOCK_FILE)[1] if a.artifact == "kafka_2.13")
    registry_version = next(a.version for a in load_lock(registry.LOCK_FILE)[1]
                            if a.artifact == "apicurio-registry-app")
    assert images["kafka"] == f"apache/kafka:{kafka_version}"
    assert images["schema-registry"] == f"apicurio/apicurio-registry:{registry_version}"
    assert images["kafka-ui"].startswith("ghcr.io/kafbat/kafka-ui:v")


def test_settings_names_and_values_are_the_local_ones() -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__}
    services = beamstream_services(load_compose())
    assert services, "no service runs the Beamstream image"
    for name, service in services.items():
        assert service["env_file"] == ["beamstream.env"], name
        environ = service_environment(service)
        unknown = {key for key in environ if key.startswith(ENV_PREFIX)} - fields - EXTRA_VARIABLES
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = load_settings(environ)  # raises SettingError on a bad value
        assert settings.kafka_bootstrap == "kafka:19092"
        assert not settings.uses_local_cluster
    # The UI reads the same registry the services write to.
    ui = load_compose()["services"]["kafka-ui"]["environment"]
    assert ui["KAFKA_CLUSTERS_0_SCHEMAREGISTRY"] == env_file(DOCKER / "beamstream.env")[
        f"{ENV_PREFIX}SCHEMA_REGISTRY_URL"]


def test_database_services_get_the_mariadb_url() -> None:
    services = load_compose()["services"]
    for name in ("ispyb-schema", "ispyb-sink"):
        url = load_settings(service_environment(services[name])).database_url
        assert url.startswith("mysql+pymysql://beamstream:") and url.endswith("@mariadb:3306/ispyb"), name
    assert services["mariadb"]["environment"]["MARIADB_DATABASE"] == "ispyb"


def test_commands_parse() -> None:
    parser = build_parser()
    for name, service in beamstream_services(load_compose()).items():
        args = parser.parse_args(service["command"])
        assert callable(args.func), name


def test_dockerfile_builds_the_package() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "pip install ." in text
    assert load_compose()["x-beamstream"]["build"]["dockerfile"] == "docker/Dockerfile"


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    return done.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_it() -> None:
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          env={**os.environ, **SECRETS}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
