"""Download pinned Maven Central artifacts once into a user cache, verifying checksums.

A lock file (JSON) lists every jar (or distribution archive, by ``classifier`` and
``extension``) with its SHA-256. A file whose checksum does not match is refused
and removed, whether it came from the network or the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from beamstream.errors import BeamstreamError

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"


class ArtifactError(BeamstreamError):
    """An artifact could not be downloaded or failed verification."""


@dataclass(frozen=True)
class Artifact:
    """One pinned file: a jar by default, or ``<artifact>-<version>-<classifier>.<extension>``."""

    group: str
    artifact: str
    version: str
    sha256: str
    size: int = 0
    classifier: str = ""
    extension: str = "jar"

    @property
    def file_name(self) -> str:
        classifier = f"-{self.classifier}" if self.classifier else ""
        return f"{self.artifact}-{self.version}{classifier}.{self.extension}"

    @property
    def relative_path(self) -> str:
        return f"{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.file_name}"


def load_lock(path: Path) -> tuple[str, list[Artifact]]:
    """Read a lock file; returns (repository URL, artifacts)."""
    document = json.loads(path.read_text())
    artifacts = [
        Artifact(a["group"], a["artifact"], a["version"], a["sha256"], a.get("size", 0),
                 a.get("classifier", ""), a.get("extension", "jar"))
        for a in document["artifacts"]
    ]
    return document.get("repository", MAVEN_CENTRAL), artifacts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                out.write(block)
        os.replace(tmp_name, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        Path(tmp_name).unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise ArtifactError(f"download of {url} failed: {reason}") from None


def fetch_artifacts(
    artifacts: Iterable[Artifact],
    cache_dir: Path,
    repository: str = MAVEN_CENTRAL,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Make sure every artifact is in ``cache_dir`` with the pinned checksum; return their paths.

    Raises :class:`ArtifactError` on a failed download or a checksum mismatch.
    """
    artifacts = list(artifacts)
    paths = []
    missing = [a for a in artifacts if not (cache_dir / a.relative_path).is_file()]
    if missing and progress:
        total = sum(a.size for a in missing) / 1e6
        print(f"downloading {len(missing)} artifacts ({total:.0f} MB) into {cache_dir}", file=sys.stderr)
    for index, artifact in enumerate(artifacts):
        path = cache_dir / artifact.relative_path
        if not path.is_file():
            if progress:
                print(f"  [{index + 1}/{len(artifacts)}] {artifact.file_name}", file=sys.stderr)
            _download(f"{repository}/{artifact.relative_path}", path, timeout)
        actual = _sha256(path)
        if actual != artifact.sha256:
            path.unlink(missing_ok=True)
            raise ArtifactError(
                f"checksum mismatch for {artifact.file_name}: "
                f"expected sha256 {artifact.sha256}, got {actual}; the file was removed"
            )
        paths.append(path)
    return paths
