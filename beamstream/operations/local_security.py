"""SASL/SCRAM and ACLs for the local cluster (``BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram``).

Two users exist: ``admin``, the broker itself and the only super user, and the
``beamstream`` service user every Beamstream client runs as, allowed only on the
deployment's prefixed topics, consumer groups and transactional ids (and on topics
outside the prefix only where an operator grants :func:`read_topic_acls`, such as a
beamline's Bluesky document topics; :func:`publish_topic_acls` are the beamline
Publisher's, on its own user).

Passwords come from files (``BEAMSTREAM_LOCAL_KAFKA_ADMIN_PASSWORD_FILE``,
``BEAMSTREAM_SASL_PASSWORD[_FILE]``) or are generated on first start into
``<home>/kafka/secrets/`` (directory 0700, files 0600). They are never printed,
never logged and never put on a command line, where ``ps`` would show them to
every user of the machine.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from beamstream.errors import BeamstreamError
from beamstream.platform.settings import ENV_PREFIX, LOCAL_SERVICE_USER, Settings

ADMIN_USER = "admin"
MECHANISM = "SCRAM-SHA-512"
#: Kafka's own default for SCRAM credentials.
SCRAM_ITERATIONS = 4096
ADMIN_PASSWORD_FILE_ENV = f"{ENV_PREFIX}LOCAL_KAFKA_ADMIN_PASSWORD_FILE"


class SecurityError(BeamstreamError):
    """Credentials or ACLs of the local cluster could not be set up."""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (also when the file already exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        handle.write(text)


def read_or_create_secret(path: Path) -> str:
    """The password in ``path``, generating a random one into a new 0600 file if there is none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror}") from None
    if text:
        return text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    # URL-safe alphabet: no quote or backslash can break the JAAS line or the argument file it goes into.
    text = secrets.token_urlsafe(32)
    write_private(path, text + "\n")
    return text


def _read_password_file(variable: str, filename: str) -> str:
    try:
        text = Path(filename).read_text().strip()
    except OSError as exc:
        raise SecurityError(f"{variable}: cannot read {filename!r}: {exc.strerror}") from None
    if not text:
        raise SecurityError(f"{variable}: {filename!r} is empty")
    return text


def admin_password(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The broker's own (super user) password: from the file the environment names, else generated."""
    environ = os.environ if environ is None else environ
    if environ.get(ADMIN_PASSWORD_FILE_ENV):
        return _read_password_file(ADMIN_PASSWORD_FILE_ENV, environ[ADMIN_PASSWORD_FILE_ENV])
    return read_or_create_secret(settings.local_kafka_secrets_dir / f"{ADMIN_USER}.password")


def service_password_file(settings: Settings) -> Path:
    """Where the generated password of the ``beamstream`` service user lives."""
    return settings.local_kafka_secrets_dir / f"{LOCAL_SERVICE_USER}.password"


def service_password(settings: Settings) -> str:
    """The service user's password: the configured SASL password, else the generated one."""
    if settings.sasl_username == LOCAL_SERVICE_USER and settings.sasl_password:
        return settings.sasl_password
    return read_or_create_secret(service_password_file(settings))


def sasl_config(username: str, password: str) -> dict[str, Any]:
    """librdkafka options to log in to the local cluster's SASL listener."""
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": MECHANISM,
            "sasl.username": username, "sasl.password": password}


def broker_properties(port: int, controller_port: int, password: str) -> dict[str, str]:
    """server.properties entries for SCRAM clients, SASL/PLAIN on the controller listener, and ACLs.

    The controller listener uses PLAIN with its one user defined in the JAAS line, because KRaft
    cannot use SCRAM there (the credentials live in the metadata log the controller serves). A
    PLAINTEXT controller listener would make every local process that connects to it anonymous, and
    the broker's own controller connection would then need ANONYMOUS as a super user.
    """
    scram_jaas = (f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                  f'username="{ADMIN_USER}" password="{password}";')
    plain_jaas = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                  f'username="{ADMIN_USER}" password="{password}" user_{ADMIN_USER}="{password}";')
    return {
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": scram_jaas,
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": plain_jaas,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{ADMIN_USER}",
    }


def service_acls(prefix: str, user: str = LOCAL_SERVICE_USER) -> list:
    """ACLs for the service user: everything under the deployment's prefix, idempotent writes on the cluster."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    principal = f"User:{user}"
    allow = AclPermissionType.ALLOW
    bindings = [AclBinding(resource, prefix, ResourcePatternType.PREFIXED, principal, "*", AclOperation.ALL, allow)
                for resource in (ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID)]
    bindings.append(AclBinding(ResourceType.BROKER, "kafka-cluster", ResourcePatternType.LITERAL, principal, "*",
                               AclOperation.IDEMPOTENT_WRITE, allow))
    return bindings


def _literal_topic_acls(topics: Iterable[str], user: str, operations: Iterable) -> list:
    """``operations`` (AclOperations) allowed to ``user`` on each of ``topics``, by literal name."""
    from confluent_kafka.admin import AclBinding, AclPermissionType, ResourcePatternType, ResourceType

    return [AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, f"User:{user}", "*", operation,
                       AclPermissionType.ALLOW)
            for topic in dict.fromkeys(topics) for operation in operations]


def read_topic_acls(topics: Iterable[str], user: str = LOCAL_SERVICE_USER) -> list:
    """ACLs that let a service user read topics it does not own, outside the deployment's prefix: Read and
    Describe on each topic by its literal name, nothing else. The Bluesky bridge needs these on the beamline's
    document topics (bluesky-kafka names them ``<beamline>.bluesky.runengine.documents``); its consumer group,
    transactional ids and output topics are under the prefix (:func:`service_acls`).
    docker/kafka/setup-bluesky.sh grants the same in compose."""
    from confluent_kafka.admin import AclOperation

    return _literal_topic_acls(topics, user, (AclOperation.READ, AclOperation.DESCRIBE))


def publish_topic_acls(topics: Iterable[str], user: str) -> list:
    """ACLs that let a producer outside Beamstream write topics by their literal names, and nothing else: Write
    and Describe on each topic. No Read, no other topic, no group, no transactional id, and no IdempotentWrite:
    since Kafka 2.8 (KIP-679) Write on a topic lets an idempotent producer (``enable.idempotence``,
    bluesky-kafka's recommended Publisher configuration) get its producer id. A beamline's bluesky-kafka
    Publisher gets these on its document topic; docker/kafka/setup-bluesky.sh grants the same in compose."""
    from confluent_kafka.admin import AclOperation

    return _literal_topic_acls(topics, user, (AclOperation.WRITE, AclOperation.DESCRIBE))


def set_scram_credential(admin, user: str, password: str, timeout: float = 30.0) -> None:
    """Create (or update) ``user``'s SCRAM-SHA-512 credential (idempotent); raises KafkaException."""
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    upsert = UserScramCredentialUpsertion(
        user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password.encode())
    for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout).values():
        future.result()


def grant_service_user(admin, settings: Settings, password: str, timeout: float = 30.0,
                       user: str = LOCAL_SERVICE_USER) -> None:
    """Create (or update) a service user's SCRAM credential and its ACLs (:func:`service_acls`); both calls
    are idempotent. ``user`` is the ``beamstream`` service user unless another is named (a second
    deployment's, a test's)."""
    try:
        set_scram_credential(admin, user, password, timeout)
        for future in admin.create_acls(service_acls(settings.topic_prefix, user), request_timeout=timeout).values():
            future.result()
    except Exception as exc:  # KafkaException: say which step, never the password
        raise SecurityError(f"granting the {user!r} user its credential and ACLs failed: {exc}") from None
