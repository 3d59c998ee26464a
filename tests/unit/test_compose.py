"""docker/compose.yaml describes a deployment that can start: checked without a Docker engine or network.

The file is interpolated the way Compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``)
and parsed with PyYAML; then: every service is there, every image is pinned (Kafka and the registry at
the versions the local launchers pin), every BEAMSTREAM_* name is a real setting with a valid value,
every Beamstream command parses, Kafka authenticates every listener and lets ACLs decide, and no
password is written into the file. The real validator, ``docker compose config``, runs too: the Compose
v2 CLI that ``scripts/install-compose`` builds (or a ``docker compose`` plugin); it needs neither an
engine nor the network. docker/kafka/*.sh run here against stand-ins for the image's Kafka tools.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from beamstream.cli.main import build_parser
from beamstream.connectors.bluesky_bridge import BlueskyBridge
from beamstream.operations import cluster, local_security, registry
from beamstream.operations.artifacts import load_lock
from beamstream.platform import metrics
from beamstream.platform.settings import ENV_PREFIX, LOCAL_SERVICE_USER, Settings, load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.events import RECORD_TOPICS
from tests.helpers.programs import require_program

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
KAFKA_SCRIPTS = DOCKER / "kafka"
INSTALL_COMPOSE = ROOT / "scripts" / "install-compose"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
#: What docker/.env holds in a deployment (docker/new-env writes it); dummies that pass the scripts' checks.
SECRETS = {
    "ISPYB_DB_PASSWORD": "test-password-not-used",
    "KAFKA_ADMIN_PASSWORD": "admin-password-for-tests",
    "KAFKA_BEAMSTREAM_PASSWORD": "service-password-for-tests",
    "KAFKA_REGISTRY_PASSWORD": "registry-password-for-tests",
    "KAFKA_UI_PASSWORD": "kafka-ui-password-for-tests",
    "KAFKA_BLUESKY_PUBLISHER_PASSWORD": "publisher-password-for-tests",
    "DASHBOARD_TOKENS": "staff:token-for-tests",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-for-tests",
}
#: Variables the environment may hold besides the settings themselves.
EXTRA_VARIABLES = {f"{ENV_PREFIX}SASL_PASSWORD_FILE", f"{ENV_PREFIX}CONFIG",
                   f"{ENV_PREFIX}LOCAL_KAFKA_ADMIN_PASSWORD_FILE"}
SERVICES = {"kafka", "kafka-security", "topics", "schema-registry", "kafka-ui", "mariadb", "ispyb-schema",
            "worker", "ispyb-sink", "archiver", "gda-feedback", "dashboard", "monitor", "prometheus",
            "grafana", "bluesky-setup", "bluesky-bridge"}
ONE_SHOT = {"kafka-security", "topics", "ispyb-schema", "bluesky-setup"}
#: Services only a Bluesky beamline runs (compose profile `bluesky`); a GDA beamline's `up` starts none of them.
BLUESKY = {"bluesky-setup", "bluesky-bridge"}
#: What docker/kafka/*.sh accept as a password: it goes unquoted into SCRAM and JAAS configuration.
PASSWORD = re.compile(r"^[A-Za-z0-9._~-]{16,}$")
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's variable substitution (the forms this project uses; ``$$`` is a literal ``$``)."""
    def substitute(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        if environ.get(name):
            return environ[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return _VARIABLE.sub(substitute, text)


def load_compose(environ: Mapping[str, str] | None = None) -> dict:
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


def load_real_settings(environ: Mapping[str, str], secret_dir: Path) -> Settings:
    """The settings a container with this environment gets, failing on a BEAMSTREAM_* name that is no setting.

    ``*_FILE`` variables name files inside the container (``/run/secrets/...``); they are pointed at
    dummies under ``secret_dir`` so that :func:`load_settings` can read them. Raises SettingError on a
    bad value. tests/unit/test_kubernetes_example.py checks its ConfigMap with this too.
    """
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__}
    unknown = {key for key in environ if key.startswith(ENV_PREFIX)} - fields - EXTRA_VARIABLES
    assert not unknown, f"not settings: {sorted(unknown)}"
    local = dict(environ)
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key.endswith("_FILE"):
            dummy = secret_dir / Path(value).name
            dummy.write_text(f"dummy-{dummy.name}\n")
            local[key] = str(dummy)
    return load_settings(local)


def server_properties(environ: Mapping[str, str]) -> dict[str, str]:
    """server.properties as the apache/kafka image writes it from KAFKA_* variables (KafkaDockerWrapper):
    ``___`` is ``-``, ``__`` is ``_``, ``_`` is ``.``, lower case."""
    not_properties = {"KAFKA_VERSION", "KAFKA_HEAP_OPTS", "KAFKA_LOG4J_OPTS", "KAFKA_OPTS", "KAFKA_JMX_OPTS",
                      "KAFKA_JVM_PERFORMANCE_OPTS", "KAFKA_GC_LOG_OPTS", "KAFKA_LOG4J_ROOT_LOGLEVEL",
                      "KAFKA_LOG4J_LOGGERS", "KAFKA_TOOLS_LOG4J_LOGLEVEL", "KAFKA_JMX_HOSTNAME"}
    properties = {}
    for key, value in environ.items():
        if key.startswith("KAFKA_") and key not in not_properties:
            name = key[len("KAFKA_"):].replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")
            properties[name.lower()] = str(value)
    return properties


def test_every_service_is_declared() -> None:
    compose = load_compose()
    assert set(compose["services"]) == SERVICES
    assert compose["services"]["worker"]["deploy"]["replicas"] >= 1
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"
        # A one-shot that restarted would redo its work forever; a service that did not would stay down.
        assert service.get("restart") == ("no" if name in ONE_SHOT else "unless-stopped"), name


def test_bluesky_services_are_in_their_profile_and_nothing_else_needs_them() -> None:
    services = load_compose()["services"]
    profiled = {name: s["profiles"] for name, s in services.items() if "profiles" in s}
    assert profiled == dict.fromkeys(BLUESKY, ["bluesky"])
    for name, service in services.items():
        needed = set(service.get("depends_on", {})) & BLUESKY
        # A GDA beamline's plain `up` would pull the bridge in through a dependency.
        assert not needed or name in BLUESKY, f"{name} depends on {sorted(needed)} of profile bluesky"
    bridge = services["bluesky-bridge"]
    assert bridge["depends_on"]["bluesky-setup"]["condition"] == "service_completed_successfully"
    assert bridge["depends_on"]["topics"]["condition"] == "service_completed_successfully"  # its changelog
    # The one document topic variable reaches the bridge's --topic and the setup that creates the topic.
    topic = build_parser().parse_args(bridge["command"]).topic
    assert topic == [services["bluesky-setup"]["environment"]["BLUESKY_DOCUMENT_TOPIC"]]
    assert topic == ["i03.bluesky.runengine.documents"]
    other = load_compose({**SECRETS, "BLUESKY_DOCUMENT_TOPIC": "i24.bluesky.runengine.documents"})["services"]
    assert build_parser().parse_args(other["bluesky-bridge"]["command"]).topic == [
        other["bluesky-setup"]["environment"]["BLUESKY_DOCUMENT_TOPIC"]] == ["i24.bluesky.runengine.documents"]


def test_passwords_are_required_not_defaulted() -> None:
    for variable in ("ISPYB_DB_PASSWORD", "KAFKA_REGISTRY_PASSWORD", "KAFKA_UI_PASSWORD"):
        with pytest.raises(KeyError, match=variable):
            load_compose({k: v for k, v in SECRETS.items() if k != variable})


def test_images_are_pinned_at_the_launchers_versions() -> None:
    images = {name: s["image"] for name, s in load_compose()["services"].items()}
    for name, image in images.items():
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    kafka_version = next(a.version for a in load_lock(cluster.LOCK_FILE)[1] if a.artifact == "kafka_2.13")
    registry_version = next(a.version for a in load_lock(registry.LOCK_FILE)[1]
                            if a.artifact == "apicurio-registry-app")
    assert images["kafka"] == images["kafka-security"] == images["bluesky-setup"] == f"apache/kafka:{kafka_version}"
    assert images["schema-registry"] == f"apicurio/apicurio-registry:{registry_version}"
    assert images["kafka-ui"].startswith("ghcr.io/kafbat/kafka-ui:v")


def test_settings_names_and_values_are_the_local_ones(tmp_path: Path) -> None:
    services = beamstream_services(load_compose())
    assert services, "no service runs the Beamstream image"
    for name, service in services.items():
        assert service["env_file"] == ["beamstream.env"], name
        settings = load_real_settings(service_environment(service), tmp_path)  # SettingError on a bad value
        assert settings.kafka_bootstrap == "kafka:19092"
        assert not settings.uses_local_cluster
        # As the local broker's clients in BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram mode: the same user and mechanism.
        assert (settings.security_protocol, settings.sasl_mechanism) == ("SASL_PLAINTEXT", local_security.MECHANISM)
        assert settings.sasl_username == LOCAL_SERVICE_USER
        assert settings.sasl_password == "dummy-kafka_beamstream_password", f"{name}: password not read from its file"
    # The UI reads the same registry the services write to.
    ui = load_compose()["services"]["kafka-ui"]["environment"]
    assert ui["KAFKA_CLUSTERS_0_SCHEMAREGISTRY"] == env_file(DOCKER / "beamstream.env")[
        f"{ENV_PREFIX}SCHEMA_REGISTRY_URL"]


def test_data_is_mounted_at_its_host_path_and_is_the_data_roots(tmp_path: Path) -> None:
    """Image events carry the paths the beamline's hosts write (GDA, the watcher, Bluesky documents): the
    services that open or check them see the data at that same path, and only there."""
    compose = load_compose({**SECRETS, "DATA_DIR": "/beamline/data"})
    readers = {"worker", "archiver", "dashboard"}  # open the files
    checkers = readers | {"bluesky-bridge"}  # refuse paths outside the data roots
    for name, service in beamstream_services(compose).items():
        settings = load_real_settings(service_environment(service), tmp_path)
        mounts = [v for v in service.get("volumes", []) if v.split(":")[0] == "/beamline/data"]
        assert mounts == (["/beamline/data:/beamline/data:ro"] if name in readers else []), name
        assert settings.data_roots == (("/beamline/data",) if name in checkers else ()), name


def test_database_services_get_the_mariadb_url(tmp_path: Path) -> None:
    services = load_compose()["services"]
    for name in ("ispyb-schema", "ispyb-sink", "dashboard"):
        url = load_real_settings(service_environment(services[name]), tmp_path).database_url
        assert url.startswith("mysql+pymysql://beamstream:") and url.endswith("@mariadb:3306/ispyb"), name
    assert services["mariadb"]["environment"]["MARIADB_DATABASE"] == "ispyb"


def test_commands_parse() -> None:
    parser = build_parser()
    for name, service in beamstream_services(load_compose()).items():
        args = parser.parse_args(service["command"])
        assert callable(args.func), name


def test_dockerfile_installs_every_package() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    # The bridge's command needs the bluesky extra (msgpack-numpy, event-model): without it, it exits with
    # "needs the bluesky extra" in the container.
    [extras] = re.findall(r'^RUN pip install "\.\[([\w,-]+)\]"', text, re.M)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "bluesky" in extras.split(",") and set(extras.split(",")) <= set(declared)
    assert "bluesky-bridge" in {s["command"][0] for s in beamstream_services(load_compose()).values()}
    assert load_compose()["x-beamstream"]["build"]["dockerfile"] == "docker/Dockerfile"
    # Every package pyproject.toml installs must be in the build context and copied in: a missing one
    # builds fine and fails only when its command runs in the container.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = ["beamstream", *setuptools["package-dir"].values()]  # the folders installed under beamstream.
    assert "dashboard" in packages
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for package in packages:
        assert f"COPY {package} ./{package}" in text, package
        assert f"!{package}/" in ignore, package


def test_published_ports_bind_loopback_only() -> None:
    published = {name: s["ports"] for name, s in load_compose()["services"].items() if "ports" in s}
    assert {"kafka", "schema-registry", "kafka-ui", "dashboard"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def kafka_host_listener(compose: dict) -> tuple[str, str]:
    """(the kafka service's one published port mapping, HOST's advertised host:port)."""
    kafka = compose["services"]["kafka"]
    [published] = kafka["ports"]
    advertised = dict(item.split("://") for item in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://") for item in kafka["environment"]["KAFKA_LISTENERS"].split(","))
    assert published.rsplit(":", 1)[1] == listeners["HOST"].rsplit(":", 1)[1], "the port published is not HOST's"
    assert advertised["INTERNAL"] == "kafka:19092"  # the containers' listener never follows the host's variables
    return published, advertised["HOST"]


def test_the_host_listener_is_on_loopback_unless_the_operator_publishes_it() -> None:
    """KAFKA_HOST_ADDRESS publishes Kafka's host listener for the beamline's RunEngine host, and
    KAFKA_HOST_ADVERTISED is where its clients are told to reconnect; both default to loopback."""
    assert kafka_host_listener(load_compose()) == ("127.0.0.1:9092:9092", "127.0.0.1:9092")
    beamline = load_compose({**SECRETS, "KAFKA_HOST_ADDRESS": "172.23.8.4",
                             "KAFKA_HOST_ADVERTISED": "i03-kafka.diamond.ac.uk:9092"})
    assert kafka_host_listener(beamline) == ("172.23.8.4:9092:9092", "i03-kafka.diamond.ac.uk:9092")
    # Only Kafka's host listener moves: every other port stays on loopback.
    for name, service in beamline["services"].items():
        if name != "kafka":
            assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", [])), name


def test_kafka_authenticates_every_listener_and_acls_decide() -> None:
    kafka = load_compose()["services"]["kafka"]
    properties = server_properties(kafka["environment"])
    listeners = dict(item.split(":") for item in properties["listener.security.protocol.map"].split(","))
    assert set(listeners) == {"INTERNAL", "CONTROLLER", "HOST"}
    assert set(listeners.values()) == {"SASL_PLAINTEXT"}, "a PLAINTEXT listener is anonymous"
    # The local broker's choices (beamstream/operations/local_security.py): SCRAM for clients and the broker itself,
    # PLAIN for the controller listener, StandardAuthorizer, one super user.
    local = local_security.broker_properties(1, 2, "x")
    for name in ("sasl.enabled.mechanisms", "sasl.mechanism.inter.broker.protocol", "authorizer.class.name",
                 "allow.everyone.if.no.acl.found", "super.users", "sasl.mechanism.controller.protocol",
                 "listener.name.controller.sasl.enabled.mechanisms"):
        assert properties[name] == local[name], name
    assert properties["inter.broker.listener.name"] == "INTERNAL"
    for listener in ("internal", "host"):
        assert "ScramLoginModule required" in properties[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"]
    # The broker's own password is resolved from the secret file by Kafka, never written into the file.
    reference = "${secrets:/run/secrets:kafka_admin_password}"
    assert properties["config.providers"] == "secrets"
    assert properties["config.providers.secrets.class"].endswith(".DirectoryConfigProvider")
    assert properties["config.providers.secrets.param.allowed.paths"] == "/run/secrets"
    logins = [v for k, v in properties.items() if k.endswith("sasl.jaas.config") and "password=" in v]
    assert len(logins) == 2  # the broker's SCRAM login and the controller's PLAIN user
    for login in logins:
        assert set(re.findall(r'\b(?:password|user_\w+)="([^"]*)"', login)) == {reference}
    assert "kafka_admin_password" in kafka["secrets"]
    assert kafka["environment"]["ADMIN_PASSWORD_FILE"] == "/run/secrets/kafka_admin_password"


def test_no_password_is_written_into_the_compose_file() -> None:
    text = COMPOSE.read_text()
    # Every JAAS password is an interpolation (.env) or a Kafka config provider reference.
    assert re.findall(r'password="(?!\$)', text) == []
    raw = yaml.safe_load(text)  # not interpolated: what is literally in the file
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("PASSWORD") and key != "MARIADB_RANDOM_ROOT_PASSWORD":  # that one is a switch
                assert str(value).startswith("${"), f"{name}: {key} is written into the file"
    # Secrets come from .env through Compose, which writes them as files into the containers.
    compose = load_compose()
    variables = {s["environment"] for s in compose["secrets"].values()}
    assert all(set(s) == {"environment"} for s in compose["secrets"].values())
    generated = env_file_text(subprocess.run(["bash", str(DOCKER / "new-env")], capture_output=True, text=True,
                                             check=True, timeout=30).stdout)
    assert variables | {"ISPYB_DB_PASSWORD"} == set(generated)
    for variable in variables - {"DASHBOARD_TOKENS"}:
        assert PASSWORD.match(generated[variable]), f"new-env writes a {variable} docker/kafka/*.sh refuse"
    assert re.match(r"^[A-Za-z0-9_.@-]+:\S{16,}$", generated["DASHBOARD_TOKENS"])
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def env_file_text(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_secret_files_are_mounted_where_they_are_read() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        environ = service_environment(service)
        wanted = {m for v in environ.values() for m in re.findall(r"/run/secrets[/:]+(\w+)", v)}
        assert wanted <= set(service.get("secrets", [])), f"{name} reads secrets it is not given"
        assert set(service.get("secrets", [])) <= set(compose["secrets"]), name
    # What each setup script reads from $secrets, besides admin's (its --command-config) and, for bluesky-setup,
    # the service user's (named by beamstream.env, so it must exist there).
    for script, service, also in (("setup-security.sh", "kafka-security", set()),
                                  ("setup-bluesky.sh", "bluesky-setup", {"kafka_beamstream_password"})):
        used = set(re.findall(r"\$secrets/(\w+)", (KAFKA_SCRIPTS / script).read_text()))
        assert used and used | {"kafka_admin_password"} | also == set(compose["services"][service]["secrets"]), script
    assert "kafka_bluesky_publisher_password" in compose["services"]["bluesky-setup"]["secrets"]
    # Only the setup step gets the Publisher's password: no Beamstream service logs in as the Publisher.
    holders = {name for name, s in compose["services"].items() if "kafka_bluesky_publisher_password" in s.get(
        "secrets", [])}
    assert holders == {"bluesky-setup"}


def test_kafka_users_are_the_ones_the_security_setup_grants() -> None:
    services = load_compose()["services"]
    setup = services["kafka-security"]
    assert setup["env_file"] == ["beamstream.env"], "the topic prefix and service user must be the services' own"
    prefix = env_file(DOCKER / "beamstream.env")[f"{ENV_PREFIX}TOPIC_PREFIX"]
    registry_env, ui_env = services["schema-registry"]["environment"], services["kafka-ui"]["environment"]
    jaas = {"registry": registry_env["apicurio.kafka.common.sasl.jaas.config"],
            "ui": ui_env["KAFKA_CLUSTERS_0_PROPERTIES_SASL_JAAS_CONFIG"]}
    assert re.search(r'username="([^"]+)"', jaas["registry"])[1] == setup["environment"]["REGISTRY_USER"]
    assert re.search(r'username="([^"]+)"', jaas["ui"])[1] == setup["environment"]["UI_USER"]
    assert registry_env["apicurio.kafka.common.sasl.mechanism"] == local_security.MECHANISM
    assert ui_env["KAFKA_CLUSTERS_0_PROPERTIES_SASL_MECHANISM"] == local_security.MECHANISM
    # The registry's ACLs cover ${prefix}registry-*: its topics and consumer groups must be named so.
    for key in ("APICURIO_KAFKASQL_TOPIC", "APICURIO_KAFKASQL_SNAPSHOTS_TOPIC",
                "APICURIO_KAFKASQL_CONSUMER_GROUP_PREFIX"):
        assert registry_env[key].startswith(f"{prefix}registry-"), key
    for name in ("schema-registry", "kafka-ui", "topics"):
        assert services[name]["depends_on"]["kafka-security"]["condition"] == "service_completed_successfully"


def test_dashboard_token_comes_from_a_secret_file_and_health_is_checked() -> None:
    dashboard = load_compose()["services"]["dashboard"]
    args = build_parser().parse_args(dashboard["command"])
    assert args.host == "0.0.0.0"  # inside the container; the host side binds loopback
    assert dashboard["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    token_file = dashboard["environment"][f"{ENV_PREFIX}DASHBOARD_TOKEN_FILE"]
    assert token_file == "/run/secrets/dashboard_tokens" and "dashboard_tokens" in dashboard["secrets"]
    assert f"{ENV_PREFIX}DASHBOARD_TOKEN" not in dashboard["environment"]
    assert not any("token" in str(part).lower() for part in dashboard["command"])
    check = " ".join(dashboard["healthcheck"]["test"])
    assert check.startswith("CMD python -c") and f"127.0.0.1:{args.port}/api/health" in check
    assert '"/api/health"' in (ROOT / "dashboard" / "web.py").read_text()


def test_monitor_only_observes_in_compose() -> None:
    monitor = load_compose()["services"]["monitor"]
    # Compose cannot be scaled from inside; the operator runs `docker compose up --scale worker=N`.
    assert monitor["command"][:1] == ["monitor"] and "--observe-only" in monitor["command"]


# -- Prometheus and Grafana ----------------------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every series name Beamstream's services export, as Prometheus stores it (``_total`` of a counter,
    ``_bucket``/``_sum``/``_count`` of a histogram), from the registries of beamstream/platform/metrics.py."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names: set[str] = set()
    for source in {id(r): r for r in vars(metrics).values() if isinstance(r, CollectorRegistry)}.values():
        for family in source.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def container_mount(service: dict, source: str) -> str:
    """Where ``service`` mounts the host path ``source`` (relative to docker/, as compose.yaml writes it)."""
    targets = [v.split(":")[1] for v in service.get("volumes", []) if v.split(":")[0] == source]
    assert len(targets) == 1, f"{source} is not mounted once: {service.get('volumes')}"
    return targets[0]


def option(command: list[str], name: str) -> str:
    """The value of ``--name=value`` in a container's command."""
    [value] = [part.split("=", 1)[1] for part in command if part.startswith(f"--{name}=")]
    return value


def scrape_targets(config: dict) -> dict[str, set[tuple[str, int]]]:
    """{job: {(host, port)}} of a Prometheus configuration's static and DNS-discovered targets."""
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            targets.update((host, int(port)) for host, port in (t.rsplit(":", 1) for t in static["targets"]))
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A", job["job_name"]  # an A lookup names every replica; SRV needs records we lack
            targets.update((name, int(dns["port"])) for name in dns["names"])
    return jobs


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_program("promtool")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    compose = load_compose()
    prometheus = compose["services"]["prometheus"]
    # The file compose mounts is the file Prometheus reads, and it listens on the port it publishes.
    assert container_mount(prometheus, "./prometheus/prometheus.yml") == option(prometheus["command"], "config.file")
    listen = int(option(prometheus["command"], "web.listen-address").rsplit(":", 1)[1])
    assert prometheus["ports"] == [f"127.0.0.1:{listen}:{listen}"]
    jobs = scrape_targets(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    parser = build_parser()
    long_running = {name: s for name, s in beamstream_services(compose).items() if name not in ONE_SHOT}
    assert {"worker", "ispyb-sink", "archiver", "gda-feedback", "monitor", "dashboard",
            "bluesky-bridge"} <= set(long_running)
    for name, service in long_running.items():
        args = parser.parse_args(service["command"])
        # The dashboard serves /metrics on its web port; every other service on --metrics-port.
        port = args.port if name == "dashboard" else args.metrics_port
        assert port is not None, f"{name} serves no metrics: add --metrics-port to its command"
        assert jobs.get(name) == {(name, port)}, f"job {name} scrapes {jobs.get(name)}, not {name}:{port}"
    replicated = {name for name, s in compose["services"].items() if s.get("deploy", {}).get("replicas", 1) > 1}
    config = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    for name in replicated:  # a static target would reach one replica of them, whichever Docker's DNS picked
        assert "dns_sd_configs" in config[name] and "static_configs" not in config[name], name
    # A service of a profile is found by DNS too: where the profile is off there is no target, not one always down.
    for name in BLUESKY - ONE_SHOT:
        assert "dns_sd_configs" in config[name] and "static_configs" not in config[name], name
    # Nothing scraped that compose does not run (Prometheus itself answers on localhost).
    assert jobs.pop("prometheus") == {("localhost", listen)}
    assert {host for targets in jobs.values() for host, _ in targets} <= set(long_running)


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    compose = load_compose()
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    provisioning = container_mount(grafana, "./grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"  # where Grafana looks (its paths.provisioning)
    [datasource] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    listen = option(prometheus["command"], "web.listen-address").rsplit(":", 1)[1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{listen}"
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "beamstream.yaml").read_text())[
        "providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == container_mount(grafana, "./grafana/dashboards")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/") and (GRAFANA / "dashboards" / Path(home).name).is_file()
    # The admin password comes from .env as a secret file, never from the file or a default.
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    dashboard = json.loads((GRAFANA / "dashboards" / "beamstream.json").read_text())
    for panel in dashboard["panels"]:
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def dashboard_queries() -> dict[str, list[str]]:
    """{panel title: its PromQL expressions} of docker/grafana/dashboards/beamstream.json."""
    dashboard = json.loads((GRAFANA / "dashboards" / "beamstream.json").read_text())
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard["panels"]}


def test_grafana_dashboard_queries_metrics_the_services_export() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "beamstream.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    queries = dashboard_queries()
    exported = exported_metric_names()
    used: set[str] = set()
    for title, expressions in queries.items():
        assert expressions and all(e.strip() for e in expressions), f"{title}: a target without a query"
        for expression in expressions:
            assert expression.count("(") == expression.count(")"), f"{title}: {expression}"
            names = set(re.findall(r"\bbeamstream_\w+", expression))
            assert names <= exported, f"{title}: no service exports {sorted(names - exported)}"
            used |= names
    # The panels staff need: rates, latency, lag, dead letters, workers, ISPyB rows, archives.
    needed = {"beamstream_worker_images_analysed_total", "beamstream_worker_result_latency_seconds_bucket",
              "beamstream_monitor_lag", "beamstream_consumer_lag", "beamstream_worker_dead_letters_total",
              "beamstream_ispyb_sink_dead_letters_total", "beamstream_archiver_dead_letters_total",
              "beamstream_monitor_workers", "beamstream_monitor_target_workers",
              "beamstream_ispyb_sink_rows_written_total", "beamstream_archiver_collections_archived_total",
              "beamstream_bluesky_bridge_documents_consumed_total", "beamstream_bluesky_bridge_events_produced_total",
              "beamstream_bluesky_bridge_dead_letters_total"}
    assert needed <= used, f"no panel shows {sorted(needed - used)}"
    # Every service that dead-letters is on the one panel staff read for dead letters.
    dead = " ".join(queries["Dead letters"])
    for name in sorted(n for n in exported if n.endswith("_dead_letters_total")):
        assert name in dead, f"the Dead letters panel does not show {name}"
    bridge = " ".join(queries["Bluesky bridge"])
    assert "sum by (document)" in bridge and "sum by (record_type)" in bridge and "sum by (error_type)" in bridge
    latency = " ".join(queries["Result latency (image arrival to result)"])
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency


# -- docker/kafka/*.sh against stand-ins for the image's Kafka tools ---------------------------------------

def _stand_in(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _kafka_environment(tmp_path: Path, password: str) -> dict[str, str]:
    kafka = load_compose()["services"]["kafka"]["environment"]
    (tmp_path / "admin_password").write_text(password)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    # kafka-run-class.sh stand-in: records its arguments and the @file, and formats like the storage tool.
    _stand_in(tmp_path / "kafka" / "bin" / "kafka-run-class.sh", f"""
printf '%s\\n' "$@" >> {tmp_path}/run-class.argv
case "$1" in @*) cp "${{1#@}}" {tmp_path}/format.args ;; esac
touch {data}/meta.properties
""")
    _stand_in(tmp_path / "image-run", f"echo started > {tmp_path}/started\n")
    return {"PATH": os.environ["PATH"], **{k: str(v) for k, v in kafka.items()},
            "KAFKA_LOG_DIRS": str(data), "ADMIN_PASSWORD_FILE": str(tmp_path / "admin_password"),
            "IMAGE_KAFKA_HOME": str(tmp_path / "kafka"), "IMAGE_RUN": str(tmp_path / "image-run")}


def _run(script: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(KAFKA_SCRIPTS / script)], env=environ, capture_output=True, text=True,
                          timeout=60)


def test_kafka_start_formats_once_with_the_admin_credential_off_the_command_line(tmp_path: Path) -> None:
    password = SECRETS["KAFKA_ADMIN_PASSWORD"]
    environ = _kafka_environment(tmp_path, password)
    done = _run("start.sh", environ)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "started").exists()
    argv = (tmp_path / "run-class.argv").read_text().split()
    assert len(argv) == 1 and argv[0].startswith("@"), argv
    assert password not in (tmp_path / "run-class.argv").read_text()
    assert not Path(argv[0][1:]).exists(), "the argument file holding the password was left behind"
    arguments = (tmp_path / "format.args").read_text().splitlines()
    assert arguments[:2] == ["kafka.tools.StorageTool", "format"]
    assert f"--cluster-id={environ['CLUSTER_ID']}" in arguments
    assert f"SCRAM-SHA-512=[name=admin,password={password}]" in arguments
    # Started again on the same volume: no second format.
    (tmp_path / "run-class.argv").unlink()
    (tmp_path / "started").unlink()
    assert _run("start.sh", environ).returncode == 0 and (tmp_path / "started").exists()
    assert not (tmp_path / "run-class.argv").exists()


def test_kafka_start_refuses_what_would_not_work(tmp_path: Path) -> None:
    for bad in ("short", SECRETS["KAFKA_ADMIN_PASSWORD"] + "\n", 'has"quote-in-it-0000'):
        environ = _kafka_environment(tmp_path, bad)
        done = _run("start.sh", environ)
        assert done.returncode == 1 and "must hold at least 16 characters" in done.stderr, bad
        assert not (tmp_path / "run-class.argv").exists()
    # A volume formatted without SCRAM (compose before SASL): the broker could not log in to itself.
    environ = _kafka_environment(tmp_path, SECRETS["KAFKA_ADMIN_PASSWORD"])
    (Path(environ["KAFKA_LOG_DIRS"]) / "meta.properties").touch()
    done = _run("start.sh", environ)
    assert done.returncode == 1 and "formatted without SCRAM credentials" in done.stderr
    assert not (tmp_path / "started").exists()


def _run_setup(tmp_path: Path, service: str, compose: dict | None = None, env: Mapping[str, str] = SECRETS,
               ) -> tuple[subprocess.CompletedProcess, dict[str, str], dict[str, list[str]]]:
    """Run a one-shot setup service's script (its compose command) with its compose environment and secrets
    (from ``env``, the .env), against stand-ins of the Kafka tools: (the run, its environment, {tool: one line
    of arguments per call})."""
    compose = compose or load_compose(env)
    setup = compose["services"][service]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in setup["secrets"]:
        (secrets / name).write_text(env.get(compose["secrets"][name]["environment"], ""))
    tools = ("kafka-configs.sh", "kafka-acls.sh", "kafka-topics.sh")
    for tool in tools:
        # Records each call's arguments, one line per call, and what a --add-config-file held.
        _stand_in(tmp_path / "kafka" / "bin" / tool, f"""
echo "$*" >> {tmp_path}/{tool}.calls
prev=""; for a in "$@"; do [ "$prev" = --add-config-file ] && cat "$a" >> {tmp_path}/scram.added; prev="$a"; done
""")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environ = {"PATH": os.environ["PATH"], "TMPDIR": str(scratch), **env_file(DOCKER / "beamstream.env"),
               **{k: str(v) for k, v in setup["environment"].items()},
               "IMAGE_KAFKA_HOME": str(tmp_path / "kafka"), "SECRETS_DIR": str(secrets)}
    assert setup["command"][:1] == ["bash"] and setup["command"][1].startswith("/opt/beamstream/"), service
    done = _run(Path(setup["command"][1]).name, environ)
    calls = {tool: (tmp_path / f"{tool}.calls").read_text().splitlines() if (tmp_path / f"{tool}.calls").exists()
             else [] for tool in tools}
    return done, environ, calls


#: kafka-acls.sh's resource options, as the names of confluent-kafka's ResourceType.
_ACL_RESOURCES = {"--topic": "TOPIC", "--group": "GROUP", "--transactional-id": "TRANSACTIONAL_ID"}


def granted_acls(calls: list[str]) -> set[tuple[str, str, str, str, str]]:
    """{(principal, resource type, name, pattern type, operation)} that kafka-acls.sh --add calls grant, named
    as confluent-kafka names them (TOPIC, PREFIXED, IDEMPOTENT_WRITE ...)."""
    grants = set()
    for line in calls:
        args = line.split()
        assert "--add" in args and "--deny-principal" not in args, line
        principal = args[args.index("--allow-principal") + 1]
        pattern = args[args.index("--resource-pattern-type") + 1].upper() if "--resource-pattern-type" in args \
            else "LITERAL"
        operations = [re.sub(r"(?<=[a-z])(?=[A-Z])", "_", args[i + 1]).upper()
                      for i, arg in enumerate(args) if arg == "--operation"]
        resources = [(_ACL_RESOURCES[arg], args[i + 1]) for i, arg in enumerate(args) if arg in _ACL_RESOURCES]
        if "--cluster" in args:
            resources.append(("BROKER", "kafka-cluster"))
        grants |= {(principal, kind, name, pattern, op) for kind, name in resources for op in operations}
    return grants


def local_acls(bindings: list) -> set[tuple[str, str, str, str, str]]:
    """The same tuples for confluent-kafka AclBindings (beamstream/operations/local_security.py's)."""
    return {(b.principal, b.restype.name, b.name, b.resource_pattern_type.name, b.operation.name) for b in bindings}


def acl_allows(grants: set[tuple[str, str, str, str, str]], principal: str, kind: str, name: str,
               operation: str) -> bool:
    """Whether ``grants`` let ``principal`` do ``operation`` on a resource: Kafka's StandardAuthorizer rules
    (ALL covers every operation; READ, WRITE, DELETE and ALTER imply DESCRIBE)."""
    implied = {operation, "ALL"} | ({"READ", "WRITE", "DELETE", "ALTER"} if operation == "DESCRIBE" else set())
    return any(who == principal and what == kind and op in implied
               and (name.startswith(pattern_name) if pattern == "PREFIXED" else pattern_name in (name, "*"))
               for who, what, pattern_name, pattern, op in grants)


def test_kafka_security_grants_the_local_acls_without_passwords_on_command_lines(tmp_path: Path) -> None:
    done, environ, tool_calls = _run_setup(tmp_path, "kafka-security")
    scratch = Path(environ["TMPDIR"])
    assert done.returncode == 0, done.stderr
    calls = "\n".join(tool_calls["kafka-configs.sh"] + tool_calls["kafka-acls.sh"])
    for secret in SECRETS.values():
        assert secret not in calls and secret not in done.stdout + done.stderr
    assert "--command-config /opt/beamstream/admin-client.properties" in calls
    assert f"--bootstrap-server {env_file(DOCKER / 'beamstream.env')[f'{ENV_PREFIX}BOOTSTRAP_SERVERS']}" in calls
    # kafka-configs.sh --add-config-file takes `mechanism=password=...` (checked against Kafka 3.9's ConfigCommand).
    added = (tmp_path / "scram.added").read_text().splitlines()
    assert added == [f"SCRAM-SHA-512=password={SECRETS[v]}" for v in
                     ("KAFKA_BEAMSTREAM_PASSWORD", "KAFKA_REGISTRY_PASSWORD", "KAFKA_UI_PASSWORD")]
    assert list(scratch.iterdir()) == [], "the file that held the passwords was left behind"
    # The service user gets what beamstream/operations/local_security.service_acls gives it on the local broker.
    prefix, user = environ[f"{ENV_PREFIX}TOPIC_PREFIX"], environ[f"{ENV_PREFIX}SASL_USERNAME"]
    acls = tool_calls["kafka-acls.sh"]
    service = [line.split() for line in acls if f"--allow-principal User:{user} " in line]
    flags = {"TOPIC": "--topic", "GROUP": "--group", "TRANSACTIONAL_ID": "--transactional-id", "BROKER": "--cluster"}
    operations = {"ALL": "All", "IDEMPOTENT_WRITE": "IdempotentWrite"}
    for binding in local_security.service_acls(prefix):
        flag, operation = flags[binding.restype.name], operations[binding.operation.name]
        assert any(flag in call and call[call.index("--operation") + 1] == operation
                   and (flag == "--cluster" or (call[call.index(flag) + 1] == binding.name
                                                and "prefixed" in call)) for call in service), binding
    ui = [line for line in acls if f"User:{environ['UI_USER']} " in line]
    assert ui and not any(op in line for line in ui for op in ("All", "Write", "Alter", "Create", "Delete"))
    # The same grants in the form the other tests compare.
    assert local_acls(local_security.service_acls(prefix, user)) <= granted_acls(acls)


def test_bluesky_setup_creates_the_document_topic_and_grants_only_reading_it(tmp_path: Path) -> None:
    done, environ, calls = _run_setup(tmp_path, "bluesky-setup")
    assert done.returncode == 0, done.stderr
    topic, user = environ["BLUESKY_DOCUMENT_TOPIC"], environ[f"{ENV_PREFIX}SASL_USERNAME"]
    publisher = environ["BLUESKY_PUBLISHER_USER"]
    assert topic == "i03.bluesky.runengine.documents" and publisher == "bluesky-publisher"
    [create] = [line.split() for line in calls["kafka-topics.sh"]]
    # Created once, never altered: an existing topic keeps the beamline's partitions and retention.
    assert create[create.index("--topic") + 1] == topic and "--create" in create and "--if-not-exists" in create
    assert create[create.index("--partitions") + 1] == "1"  # one publisher key: one partition is read anyway
    assert create[create.index("--replication-factor") + 1] == environ[f"{ENV_PREFIX}REPLICATION_FACTOR"]
    for call in [create, *(line.split() for line in calls["kafka-acls.sh"])]:
        assert call[call.index("--command-config") + 1] == "/opt/beamstream/admin-client.properties"
        assert call[call.index("--bootstrap-server") + 1] == environ[f"{ENV_PREFIX}BOOTSTRAP_SERVERS"]
    # Read and Describe on that one topic, as the local cluster's read_topic_acls: nothing more; the Publisher's
    # grants are the next test's.
    grants = granted_acls(calls["kafka-acls.sh"])
    assert {g for g in grants if g[0] == f"User:{user}"} == local_acls(local_security.read_topic_acls([topic], user))
    assert {g[0] for g in grants} == {f"User:{user}", f"User:{publisher}"}
    for secret in SECRETS.values():
        assert secret not in "\n".join(calls["kafka-topics.sh"] + calls["kafka-acls.sh"]) + done.stdout + done.stderr


def test_bluesky_setup_gives_the_publisher_its_credential_and_only_writing_the_topic(tmp_path: Path) -> None:
    """The beamline's Publisher: its SCRAM credential from its secret file, through a 0600 file and never a command
    line; Write and Describe on the document topic (local_security.publish_topic_acls), so it may not read the
    topic, write another, or touch a group, a transactional id or the cluster."""
    compose = load_compose({**SECRETS, "BLUESKY_DOCUMENT_TOPIC": "i24.bluesky.runengine.documents"})
    done, environ, calls = _run_setup(tmp_path, "bluesky-setup", compose)
    assert done.returncode == 0, done.stderr
    topic, publisher = environ["BLUESKY_DOCUMENT_TOPIC"], environ["BLUESKY_PUBLISHER_USER"]
    [configs] = [line.split() for line in calls["kafka-configs.sh"]]
    assert configs[configs.index("--entity-name") + 1] == publisher and "--alter" in configs
    assert configs[configs.index("--command-config") + 1] == environ["ADMIN_CLIENT_CONFIG"]
    password = SECRETS["KAFKA_BLUESKY_PUBLISHER_PASSWORD"]
    assert (tmp_path / "scram.added").read_text().splitlines() == [f"SCRAM-SHA-512=password={password}"]
    assert password not in "\n".join(sum(calls.values(), [])) + done.stdout + done.stderr
    assert list(Path(environ["TMPDIR"]).iterdir()) == [], "the file that held the password was left behind"
    principal = f"User:{publisher}"
    mine = {g for g in granted_acls(calls["kafka-acls.sh"]) if g[0] == principal}
    assert mine == local_acls(local_security.publish_topic_acls([topic], publisher))
    assert mine == {(principal, "TOPIC", topic, "LITERAL", "WRITE"), (principal, "TOPIC", topic, "LITERAL", "DESCRIBE")}
    assert acl_allows(mine, principal, "TOPIC", topic, "WRITE")
    assert not acl_allows(mine, principal, "TOPIC", topic, "READ")
    assert not acl_allows(mine, principal, "TOPIC", "i03.bluesky.runengine.documents", "WRITE")
    assert not acl_allows(mine, principal, "TOPIC", f"{environ[f'{ENV_PREFIX}TOPIC_PREFIX']}images", "WRITE")


def test_bluesky_setup_stops_before_any_change_without_the_publishers_password(tmp_path: Path) -> None:
    """A docker/.env from before the Publisher's user: one line naming the secret file (and new-env), nothing done."""
    for old_env in ({k: v for k, v in SECRETS.items() if k != "KAFKA_BLUESKY_PUBLISHER_PASSWORD"},  # empty file
                    {**SECRETS, "KAFKA_BLUESKY_PUBLISHER_PASSWORD": "too-short"}):
        (tmp_path / "run").mkdir()
        done, _, calls = _run_setup(tmp_path / "run", "bluesky-setup", env=old_env)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("bluesky-setup: /") and "kafka_bluesky_publisher_password must hold" in \
            done.stderr and "docker/new-env" in done.stderr
        assert "too-short" not in done.stderr
        assert calls == {"kafka-configs.sh": [], "kafka-acls.sh": [], "kafka-topics.sh": []}
        shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("topic", ["i03 documents", "..", "i03/documents"])
def test_bluesky_setup_refuses_a_bad_topic_name_in_one_line(tmp_path: Path, topic: str) -> None:
    done, _, calls = _run_setup(tmp_path, "bluesky-setup", load_compose({**SECRETS, "BLUESKY_DOCUMENT_TOPIC": topic}))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"bluesky-setup: BLUESKY_DOCUMENT_TOPIC='{topic}' is not a Kafka topic name")
    assert calls == {"kafka-configs.sh": [], "kafka-acls.sh": [], "kafka-topics.sh": []}


def bridge_needs(tmp_path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(principal, [(resource type, name, operation)]) the compose bridge needs, from the bridge itself built with
    its container's settings and command: what it reads, writes, joins and commits as."""
    service = load_compose()["services"]["bluesky-bridge"]
    settings = load_real_settings(service_environment(service), tmp_path)
    bridge = BlueskyBridge(settings, build_parser().parse_args(service["command"]).topic)  # connects to nothing
    changelog = bridge.processor.runs.changelog_topic
    outputs = dict.fromkeys(topic_name(settings, RECORD_TOPICS[r])  # the record types a run becomes
                            for r in ("CollectionStarted", "ImageArrived", "CollectionEnded"))
    needs = [("TOPIC", topic, op) for topic in bridge.document_topics for op in ("READ", "DESCRIBE")]
    needs += [("TOPIC", changelog, op) for op in ("READ", "WRITE", "DESCRIBE")]  # restored, then written
    needs += [("TOPIC", topic, op) for topic in [*outputs, bridge.processor.dead_letters.topic]
              for op in ("WRITE", "DESCRIBE")]
    needs += [("GROUP", bridge.stage.group_id, "READ"), ("BROKER", "kafka-cluster", "IDEMPOTENT_WRITE")]
    needs += [("TRANSACTIONAL_ID", bridge.stage.transactional_id, op) for op in ("WRITE", "DESCRIBE")]
    assert bridge.stage.group_id == f"{settings.topic_prefix}bluesky-bridge"
    assert {name for kind, name, _ in needs if kind == "TOPIC"} >= {
        f"{settings.topic_prefix}{t}" for t in ("images", "collections", "deadletter", "bluesky-bridge-changelog")}
    return f"User:{settings.sasl_username}", needs


def test_the_bridges_user_may_do_all_the_bridge_does_in_compose_and_on_the_local_cluster(tmp_path: Path) -> None:
    (tmp_path / "bridge").mkdir()
    principal, needs = bridge_needs(tmp_path / "bridge")
    compose = set()
    for service in ("kafka-security", "bluesky-setup"):
        (tmp_path / service).mkdir()
        done, environ, calls = _run_setup(tmp_path / service, service)
        assert done.returncode == 0, done.stderr
        compose |= granted_acls(calls["kafka-acls.sh"])
    user = principal.removeprefix("User:")
    document_topics = [name for kind, name, op in needs if kind == "TOPIC" and op == "READ"
                       and not name.startswith(environ[f"{ENV_PREFIX}TOPIC_PREFIX"])]
    local = local_acls(local_security.service_acls(environ[f"{ENV_PREFIX}TOPIC_PREFIX"], user)
                       + local_security.read_topic_acls(document_topics, user))
    for where, grants in (("compose", compose), ("the local cluster", local)):
        missing = [need for need in needs if not acl_allows(grants, principal, *need)]
        assert not missing, f"{where}: {principal} may not {missing}"
    # The checker itself refuses what nobody granted: the document topic without its read grant.
    assert not acl_allows(local_acls(local_security.service_acls(environ[f"{ENV_PREFIX}TOPIC_PREFIX"], user)),
                          principal, "TOPIC", document_topics[0], "READ")
    assert not acl_allows(compose, principal, "TOPIC", document_topics[0], "WRITE")  # read only


# -- the real validator ----------------------------------------------------------------------------------------

def _compose_command() -> list[str] | None:
    """scripts/install-compose's binary, else a `docker compose` plugin, else a v2 `docker-compose`."""
    version = re.search(r"^VERSION=(\S+)$", INSTALL_COMPOSE.read_text(), re.M)[1]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "beamstream" / "compose" / version
    built = Path(os.environ.get("BEAMSTREAM_COMPOSE_DIR") or cache) / "docker-compose"
    if os.access(built, os.X_OK):
        return [str(built)]
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            done = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and re.search(r"\bv?2\.", done.stdout):
                return command
    return None


COMPOSE_CLI = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE_CLI is None, reason="Docker Compose v2 is not installed (scripts/install-compose builds it; needs Go)")


def compose_config(compose_file: Path, tmp_path: Path, environ: Mapping[str, str] = SECRETS,
                   profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`docker compose config` with only `environ` as the .env: no operator's docker/.env, no COMPOSE_* of ours."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOSE_", "BLUESKY_", "KAFKA_HOST_")) and k not in SECRETS}
    options = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run([*COMPOSE_CLI, "--env-file", str(empty), "-f", str(compose_file), *options, "config",
                           "--format", "json"], env={**env, **environ}, capture_output=True, text=True, timeout=60)


@needs_compose
def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    done = compose_config(COMPOSE, tmp_path)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["services"]) == SERVICES - BLUESKY  # a GDA beamline's `up`
    done = compose_config(COMPOSE, tmp_path, profiles=("bluesky",))
    assert done.returncode == 0, done.stderr
    normalised = json.loads(done.stdout)
    assert set(normalised["services"]) == SERVICES
    bridge = normalised["services"]["bluesky-bridge"]
    assert bridge["command"][:3] == ["bluesky-bridge", "--topic", "i03.bluesky.runengine.documents"]
    assert set(bridge["depends_on"]) == {"kafka", "topics", "schema-registry", "bluesky-setup"}
    for name, service in normalised["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", name
    assert {s["environment"] for s in normalised["secrets"].values()} == set(SECRETS) - {"ISPYB_DB_PASSWORD"}
    # `$$` reaches the container as `$`: Kafka, not Compose, resolves the admin password.
    kafka = normalised["services"]["kafka"]["environment"]
    jaas = kafka["KAFKA_LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG"]
    assert "{secrets:/run/secrets:kafka_admin_password}" in jaas and SECRETS["KAFKA_ADMIN_PASSWORD"] not in jaas
    # The beamline's address for Kafka's host listener, as Compose itself reads it.
    done = compose_config(COMPOSE, tmp_path, {**SECRETS, "KAFKA_HOST_ADDRESS": "172.23.8.4",
                                              "KAFKA_HOST_ADVERTISED": "i03-kafka.diamond.ac.uk:9092"})
    assert done.returncode == 0, done.stderr
    kafka = json.loads(done.stdout)["services"]["kafka"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in kafka["ports"]] == [("172.23.8.4", "9092", 9092)]
    assert kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].endswith(",HOST://i03-kafka.diamond.ac.uk:9092")


@needs_compose
def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DOCKER, copy, ignore=shutil.ignore_patterns(".env", "kubernetes"))
    assert compose_config(copy / "compose.yaml", tmp_path).returncode == 0  # the copy itself is valid
    broken = copy / "compose.yaml"
    broken.write_text(broken.read_text().replace("  worker:\n", "  worker:\n    replicaz: 3\n", 1))
    done = compose_config(broken, tmp_path)
    assert done.returncode != 0 and "replicaz" in done.stderr


@needs_compose
def test_docker_compose_config_requires_the_database_password(tmp_path: Path) -> None:
    done = compose_config(COMPOSE, tmp_path, {k: v for k, v in SECRETS.items() if k != "ISPYB_DB_PASSWORD"})
    assert done.returncode != 0 and "put ISPYB_DB_PASSWORD in docker/.env" in done.stderr
