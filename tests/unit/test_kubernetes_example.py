"""docker/kubernetes/: the KEDA example scales the workers on the lag Beamstream itself would watch.

Every manifest is parsed with PyYAML (no cluster needed); then: the ScaledObject targets the worker
Deployment, its kafka trigger names the consumer group and topic beamstream.topics derives from the
ConfigMap's prefix, it never asks for more workers than the images topic has partitions, the
ConfigMap holds only real settings with valid values, the container's command parses, and no
secret is written into a manifest.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from beamstream.cli.main import build_parser
from beamstream.platform.settings import ENV_PREFIX
from beamstream.platform.topics import declared_topics, group_name, topic_name
from tests.unit.test_compose import DOCKER, load_real_settings

KUBERNETES = DOCKER / "kubernetes"


def documents() -> list[dict]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def the(kind: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


@pytest.fixture
def settings(tmp_path: Path):
    return load_real_settings(the("ConfigMap")["data"], tmp_path)


def test_every_manifest_is_applied_by_the_kustomization() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    assert {d["kind"] for _, d in documents()} == {
        "ConfigMap", "Deployment", "ScaledObject", "TriggerAuthentication", "Kustomization"}


def test_configmap_holds_real_settings(settings) -> None:
    data = the("ConfigMap")["data"]
    assert all(key.startswith(ENV_PREFIX) for key in data)
    assert all(isinstance(value, str) for value in data.values()), "ConfigMap values must be strings"
    assert not settings.uses_local_cluster
    assert settings.sasl_mechanism and settings.sasl_username
    assert settings.sasl_password == "dummy-password", "the password is not read from the file the Secret mounts"


def test_scaled_object_targets_the_worker_deployment() -> None:
    deployment, scaled = the("Deployment"), the("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container.get("command", []) + container["args"])
    assert args.command == "worker" and callable(args.func)
    assert container["image"] == yaml.safe_load((DOCKER / "compose.yaml").read_text())["x-beamstream"]["image"]
    assert {"configMapRef": {"name": the("ConfigMap")["metadata"]["name"]}} in container["envFrom"]


def test_trigger_watches_the_analysis_group_on_the_images_topic(settings) -> None:
    scaled, auth = the("ScaledObject"), the("TriggerAuthentication")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    # The workers' analysis stage, not the Faust application's table group <prefix>workers.
    assert metadata["consumerGroup"] == group_name(settings, "analysis")
    assert metadata["consumerGroup"] != f"{settings.topic_prefix}workers"
    assert metadata["topic"] == topic_name(settings, "images")
    assert metadata["bootstrapServersFromEnv"] in the("ConfigMap")["data"]
    assert int(metadata["lagThreshold"]) > 0
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_workers_never_outnumber_image_partitions(settings) -> None:
    spec = the("ScaledObject")["spec"]
    images = next(t for t in declared_topics(settings) if t.logical_name == "images")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= images.partitions
    assert images.partitions == settings.image_partitions


#: KEDA's name for each SASL mechanism Beamstream supports.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


def test_kafka_login_comes_from_the_secret_as_a_file(settings) -> None:
    auth = the("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in auth} == {"sasl", "username", "password", "tls"}
    (secret,) = {ref["name"] for ref in auth}
    pod = the("Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    (item,) = volume["secret"]["items"]
    password_file = the("ConfigMap")["data"][f"{ENV_PREFIX}SASL_PASSWORD_FILE"]
    assert item["key"] == "password" and password_file == f"{mount['mountPath']}/{item['path']}"
    # The README's recipe for the Secret gives KEDA the workers' own user and mechanism.
    readme = (KUBERNETES / "README.md").read_text()
    assert f"--from-literal=sasl={KEDA_SASL[settings.sasl_mechanism]}" in readme
    assert f"--from-literal=username={settings.sasl_username}" in readme
    assert "--from-file=password=" in readme and "--from-literal=password" not in readme


def _mappings(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)


def test_no_secret_is_written_into_a_manifest() -> None:
    secretish = re.compile(r"password|secret|token", re.I)
    for name, document in documents():
        assert document["kind"] != "Secret", f"{name}: Secrets are created by hand (README.md), not committed"
        for mapping in _mappings(document):
            for key, value in mapping.items():
                # Under such keys only paths of mounted files and names of Secrets may stand.
                if secretish.search(str(key)) and isinstance(value, str):
                    assert value.startswith("/") or key == "secretName", f"{name}: {key}: {value!r}"
            # An env entry {name: ..._PASSWORD, value: ...} would hold the secret itself.
            if secretish.search(str(mapping.get("name", ""))) and "value" in mapping:
                raise AssertionError(f"{name}: {mapping['name']} has a literal value")


def test_workers_see_the_data_at_the_data_roots(settings) -> None:
    # Image events carry the paths the beamline's hosts write: the data is mounted at exactly those roots.
    container = the("Deployment")["spec"]["template"]["spec"]["containers"][0]
    mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"}
    assert mounted == set(settings.data_roots) and settings.data_roots
