"""Pinned artifacts: verified checksums, refused mismatches, clear download errors."""

import hashlib
import json

import pytest

from beamstream.operations.artifacts import Artifact, ArtifactError, fetch_artifacts, load_lock
from beamstream.operations.cluster import LOCK_FILE


def _repository(tmp_path, content: bytes) -> tuple[str, Artifact]:
    repo = tmp_path / "repo"
    artifact = Artifact("org.example", "thing", "1.0", hashlib.sha256(content).hexdigest(), len(content))
    path = repo / artifact.relative_path
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return repo.as_uri(), artifact


def test_download_once_and_verify(tmp_path):
    url, artifact = _repository(tmp_path, b"jar bytes")
    cache = tmp_path / "cache"
    [path] = fetch_artifacts([artifact], cache, url, progress=False)
    assert path.read_bytes() == b"jar bytes"
    (tmp_path / "repo" / artifact.relative_path).unlink()  # a second run needs no network
    assert fetch_artifacts([artifact], cache, url, progress=False) == [path]


def test_checksum_mismatch_is_refused_and_removed(tmp_path):
    url, artifact = _repository(tmp_path, b"tampered")
    wrong = Artifact(artifact.group, artifact.artifact, artifact.version, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError, match="checksum mismatch for thing-1.0.jar"):
        fetch_artifacts([wrong], cache, url, progress=False)
    assert not (cache / wrong.relative_path).exists()


def test_failed_download_names_the_url(tmp_path):
    artifact = Artifact("org.example", "absent", "1.0", "0" * 64)
    with pytest.raises(ArtifactError, match="download of .*absent-1.0.jar failed"):
        fetch_artifacts([artifact], tmp_path / "cache", (tmp_path / "nowhere").as_uri(), progress=False)


def test_kafka_lock_file_pins_every_jar_with_sha256():
    repository, artifacts = load_lock(LOCK_FILE)
    assert repository.startswith("https://")
    names = {a.artifact for a in artifacts}
    assert {"kafka_2.13", "kafka-clients", "kafka-raft", "kafka-metadata", "slf4j-reload4j"} <= names
    assert all(len(a.sha256) == 64 and a.version for a in artifacts)
    assert json.loads(LOCK_FILE.read_text())["kafka_version"] == "3.9.2"
