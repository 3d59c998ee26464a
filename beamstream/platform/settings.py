"""Beamstream settings: environment variables over an optional TOML file over defaults.

Every setting has one name, used as ``BEAMSTREAM_<NAME>`` in the environment and
as ``<name>`` (lower case) in the config file. Anything not set falls back to the
local cluster and embedded defaults, so a fresh clone needs no configuration.
Secrets (SASL password) are read from the environment or from a file, never
from the command line, and never appear in ``repr``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from beamstream.errors import SettingError

ENV_PREFIX = "BEAMSTREAM_"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOCAL_KAFKA_SECURITY = ("none", "scram")
#: The local cluster's service user in ``scram`` mode: every Beamstream client authenticates as it.
LOCAL_SERVICE_USER = "beamstream"


def _default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "beamstream"


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "beamstream"


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :func:`load_settings`."""

    #: Kafka bootstrap servers; empty means "the local cluster this machine runs".
    bootstrap_servers: str = ""
    #: Port of the local cluster's client listener (its controller uses port + 1). Node i (from 1) of a
    #: several-node cluster uses port + 2(i - 1) and the port after it.
    local_kafka_port: int = 39092
    #: Nodes (broker and controller each) of the local cluster: 1, 3 or 5. Unless set, what the cluster's
    #: home recorded when it was formatted (``cluster up --brokers N``), else 1.
    local_kafka_nodes: int = 1
    #: Security of the local cluster: ``none`` (PLAINTEXT, anyone on this host may connect) or ``scram``
    #: (SASL/SCRAM-SHA-512 and ACLs; commands then authenticate as the ``beamstream`` service user).
    local_kafka_security: str = "none"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    #: Confluent-compatible Schema Registry; empty means Avro single-object encoding.
    schema_registry_url: str = ""
    #: Port of the local schema registry (``beamstream.registry.LocalRegistry``) on loopback.
    local_registry_port: int = 39102
    #: SQLAlchemy URL of the ISPyB database; empty means the demo's SQLite file.
    ispyb_url: str = ""
    #: Directories image events may point into (os.pathsep-separated in the environment).
    data_roots: tuple[str, ...] = ()
    #: Where the archiver writes collection manifests (``<archive_root>/<dcid>/``); empty means
    #: next to the data, as ``<template stem>.manifest.json``.
    archive_root: str = ""
    #: Staff token for the dashboard's actions (reinject, reprocess); empty: read-only unless a file is set.
    #: ``name:secret`` names the holder in the action log. Prefer ``dashboard_token_file`` in production.
    dashboard_token: str = ""
    #: File of dashboard staff tokens, one ``name:secret`` (or bare secret) per line; re-read on each action.
    dashboard_token_file: str = ""
    #: Also send every service's JSON log lines to the ``logs`` topic (best effort, see beamstream.logs).
    log_topic: bool = False
    #: Prefix of every topic name, so several deployments can share one cluster.
    topic_prefix: str = "beamstream."
    image_partitions: int = 12
    #: Replicas of each topic ``topics apply`` creates; 0: the cluster's ``default.replication.factor``
    #: (the local cluster sets it to 3 when it runs 3 or more nodes, else 1). An explicit factor also sets
    #: each topic's ``min.insync.replicas`` to min(2, factor); with 0 the cluster's default holds.
    replication_factor: int = 0
    #: Where the local cluster keeps its data and logs.
    home: Path = field(default_factory=_default_home)
    #: Where downloaded artifacts (Kafka jars) are cached.
    cache_dir: Path = field(default_factory=_default_cache)

    @property
    def uses_local_cluster(self) -> bool:
        """True when no external cluster is configured and the launcher manages one."""
        return not self.bootstrap_servers

    @property
    def local_kafka_secrets_dir(self) -> Path:
        """Where the local cluster keeps its generated passwords (mode 0700, files 0600)."""
        return self.home / "kafka" / "secrets"

    @property
    def local_kafka_nodes_file(self) -> Path:
        """Where the local cluster records how many nodes its storage was formatted for."""
        return self.home / "kafka" / "nodes"

    @property
    def local_kafka_ports(self) -> tuple[int, ...]:
        """The client port of each node of the local cluster (node 1 first)."""
        return tuple(self.local_kafka_port + 2 * i for i in range(self.local_kafka_nodes))

    @property
    def kafka_bootstrap(self) -> str:
        """The bootstrap servers clients connect to (every node of the local cluster: any may be down)."""
        return self.bootstrap_servers or ",".join(f"127.0.0.1:{port}" for port in self.local_kafka_ports)

    @property
    def database_url(self) -> str:
        """The ISPyB database URL, defaulting to a SQLite file under ``home``."""
        return self.ispyb_url or f"sqlite:///{self.home / 'ispyb.sqlite'}"

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka (confluent-kafka) client options for the configured cluster."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password
        for key, value in (
            ("ssl.ca.location", self.ssl_cafile),
            ("ssl.certificate.location", self.ssl_certfile),
            ("ssl.key.location", self.ssl_keyfile),
        ):
            if value:
                config[key] = value
        return config


_PATH_LIKE = ("home", "cache_dir", "data_roots")

_BOOLS = ("log_topic",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_INT_RANGES = {
    "local_kafka_port": (1, 65534),
    "local_registry_port": (1, 65535),
    "local_kafka_nodes": (1, 5),
    "image_partitions": (1, 10_000),
    "replication_factor": (0, 100),
}


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a raw string/TOML value into the setting's type, naming the setting on error."""
    where = f"{ENV_PREFIX}{name.upper()}" if source == "env" else f"{source}: {name}"
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise SettingError(f"{where}: expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingError(f"{where}: must be between {low} and {high}, got {value}")
        if name == "local_kafka_nodes" and value % 2 == 0:
            # KRaft needs a majority of its controllers: an even count tolerates no more failures than one fewer.
            raise SettingError(f"{where}: must be 1, 3 or 5 (an odd number of controllers), got {value}")
        return value
    if name in _BOOLS:
        if isinstance(raw, bool):
            return raw
        text = raw.strip().lower() if isinstance(raw, str) else None
        if text not in _TRUE + _FALSE:
            raise SettingError(f"{where}: expected true or false (1/0, yes/no, on/off), got {raw!r}")
        return text in _TRUE
    if name in ("home", "cache_dir"):
        return Path(str(raw)).expanduser()
    if name == "archive_root" and isinstance(raw, str | Path):
        return str(Path(raw).expanduser()) if str(raw).strip() else ""
    if name == "data_roots":
        items = raw.split(os.pathsep) if isinstance(raw, str) else list(raw)
        return tuple(str(Path(p).expanduser()) for p in items if str(p).strip())
    if not isinstance(raw, str):
        raise SettingError(f"{where}: expected a string, got {raw!r}")
    if name == "security_protocol":
        value = raw.upper()
        if value not in SECURITY_PROTOCOLS:
            raise SettingError(f"{where}: must be one of {', '.join(SECURITY_PROTOCOLS)}, got {raw!r}")
        return value
    if name == "local_kafka_security":
        value = raw.strip().lower() or "none"
        if value not in LOCAL_KAFKA_SECURITY:
            raise SettingError(f"{where}: must be one of {', '.join(LOCAL_KAFKA_SECURITY)}, got {raw!r}")
        return value
    if name == "sasl_mechanism" and raw:
        value = raw.upper()
        if value not in SASL_MECHANISMS:
            raise SettingError(f"{where}: must be one of {', '.join(SASL_MECHANISMS)}, got {raw!r}")
        return value
    if name == "bootstrap_servers" and raw:
        for server in raw.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise SettingError(f"{where}: expected host:port[,host:port...], got {raw!r}")
    if name == "schema_registry_url" and raw and not raw.startswith(("http://", "https://")):
        raise SettingError(f"{where}: expected an http:// or https:// URL, got {raw!r}")
    return raw


def _config_file(environ: Mapping[str, str]) -> Path | None:
    explicit = environ.get(f"{ENV_PREFIX}CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingError(f"{ENV_PREFIX}CONFIG: no such file {str(path)!r}")
        return path
    for candidate in (Path("beamstream.toml"), Path.home() / ".config" / "beamstream" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Resolve settings: keyword overrides, then ``BEAMSTREAM_*`` variables, then the
    config file (``$BEAMSTREAM_CONFIG``, ``./beamstream.toml`` or
    ``~/.config/beamstream/config.toml``), then defaults.

    Raises :class:`SettingError` naming the setting when a value is invalid.
    """
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = _config_file(environ)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingError(f"config file {path}: {exc}") from None
        section = document.get("beamstream", document)
        for key, raw in section.items():
            if key not in names:
                raise SettingError(f"config file {path}: unknown setting {key!r}")
            values[key] = _convert(key, raw, str(path))

    for name in names:
        raw = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None:
            values[name] = _convert(name, raw, "env")

    password_file = environ.get(f"{ENV_PREFIX}SASL_PASSWORD_FILE")
    if password_file and "sasl_password" not in values:
        try:
            values["sasl_password"] = Path(password_file).read_text().strip()
        except OSError as exc:
            raise SettingError(
                f"{ENV_PREFIX}SASL_PASSWORD_FILE: cannot read {password_file!r}: {exc.strerror}"
            ) from None

    for name, raw in overrides.items():
        if name not in names:
            raise SettingError(f"unknown setting {name!r}")
        values[name] = _convert(name, raw, "override") if isinstance(raw, str) or name in _PATH_LIKE else raw

    settings = _local_scram_client(_recorded_nodes(Settings(**values), explicit="local_kafka_nodes" in values))
    if settings.sasl_mechanism and not settings.security_protocol.startswith("SASL"):
        raise SettingError(
            f"{ENV_PREFIX}SASL_MECHANISM is set but {ENV_PREFIX}SECURITY_PROTOCOL is "
            f"{settings.security_protocol}; use SASL_PLAINTEXT or SASL_SSL"
        )
    return settings


def _recorded_nodes(settings: Settings, explicit: bool) -> Settings:
    """Unless set, the local cluster's node count as its home recorded it (``cluster up --brokers N``), so
    ``status``, ``down`` and every client (bootstrap on each node) know it without being told again."""
    if explicit or not settings.uses_local_cluster:
        return settings
    try:
        recorded = settings.local_kafka_nodes_file.read_text().strip()
    except OSError:
        return settings  # one node, or not formatted yet
    try:
        return replace(settings, local_kafka_nodes=_convert("local_kafka_nodes", recorded,
                                                            str(settings.local_kafka_nodes_file)))
    except SettingError as exc:
        raise SettingError(f"{exc}; run `beamstream cluster up --reset` to format it again") from None


def _local_scram_client(settings: Settings) -> Settings:
    """In ``scram`` mode, point clients of the local cluster at its SASL listener as the service user.

    The password is whatever ``BEAMSTREAM_SASL_PASSWORD[_FILE]`` gave, else the one the launcher generated
    under :attr:`Settings.local_kafka_secrets_dir` (absent until the first ``cluster up``). Explicit SASL
    settings win, so an operator can still log in as another user.
    """
    if settings.local_kafka_security != "scram" or not settings.uses_local_cluster:
        return settings
    password = settings.sasl_password
    if not password:
        try:
            password = (settings.local_kafka_secrets_dir / f"{LOCAL_SERVICE_USER}.password").read_text().strip()
        except OSError:
            password = ""  # not generated yet: `beamstream cluster up` creates it
    return replace(
        settings,
        security_protocol="SASL_PLAINTEXT" if settings.security_protocol == "PLAINTEXT" else settings.security_protocol,
        sasl_mechanism=settings.sasl_mechanism or "SCRAM-SHA-512",
        sasl_username=settings.sasl_username or LOCAL_SERVICE_USER,
        sasl_password=password,
    )


def path_within_roots(path: str, roots: tuple[str, ...]) -> bool:
    """True when ``path`` lies inside one of ``roots`` (any path when no roots are configured:
    ``Settings.data_roots`` empty)."""
    if not roots:
        return True
    try:
        resolved = Path(path).resolve()
    except (ValueError, OSError, RuntimeError):  # a NUL byte in the path, a symlink loop: no file in a root
        return False
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)
