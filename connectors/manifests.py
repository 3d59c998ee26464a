"""Archive manifests: every file of a collection with its size and SHA-256, as a JSON file. No Kafka.

A collection's files come from its CollectionStarted ``file_template``:

* a CBF ``#`` template (``thau_1_####.cbf``): one file per image;
* an EIGER/NeXus master (``scan_master.h5``): the master, every data file it
  links (``/entry/data/data_NNNNNN`` external links) and every
  ``scan_data_*.h5`` next to it.

The manifest holds nothing that changes between two runs over the same files
(no "written at" time), so writing it again for unchanged files gives the same
bytes, and an identical manifest already on disk is left alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from pathlib import Path

from beamstream.errors import BeamstreamError
from beamstream.producers.scanning import cbf_file_name, is_nexus_template

MANIFEST_FORMAT = "beamstream-archive-manifest/1"
_CHUNK = 4 << 20
#: The most images a manifest lists (as many as a collection's table can count, ``MAX_IMAGE_NUMBER`` of the
#: collect stage): a start naming two billion images would otherwise hold the archiver for hours.
MAX_IMAGES = 2**21


class ManifestError(BeamstreamError):
    """A collection whose manifest cannot be made (the message says why)."""


class Interrupted(Exception):
    """Hashing was stopped (the service is shutting down); nothing was written."""


def template_stem(file_template: str) -> str:
    """The template's file name without extension and without its ``#`` run: ``thau_1_####.cbf`` -> ``thau_1``."""
    stem = Path(file_template).name
    stem = re.sub(r"\.(cbf|h5|hdf5|nxs|nx5)$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[_.-]?#+", "", stem) or "collection"


def manifest_path(started: dict, archive_root: str = "") -> Path:
    """Where a collection's manifest goes: ``<archive_root>/<dcid>/`` or, without an archive root,
    next to the data; ``<stem>.manifest.json``, ``<stem>.pj<id>.manifest.json`` for reprocessing jobs."""
    job = started.get("processing_job_id")
    name = f"{template_stem(started['file_template'])}{f'.pj{job}' if job is not None else ''}.manifest.json"
    folder = Path(archive_root) / str(started["dcid"]) if archive_root else Path(started["file_template"]).parent
    return folder / name


def expected_files(file_template: str, first_image: int, n_images: int) -> list[Path]:
    """Every file a collection should have, in order (the master first for NeXus)."""
    if not is_nexus_template(file_template):
        return [cbf_file_name(file_template, n) for n in range(first_image, first_image + n_images)]
    master = Path(file_template)
    prefix = re.sub(r"_master$", "", re.sub(r"\.(h5|hdf5|nxs|nx5)$", "", master.name, flags=re.IGNORECASE))
    data = set(master.parent.glob(f"{glob.escape(prefix)}_data_*.h5")) | set(_linked_data_files(master))
    return [master, *sorted(data)]


def _linked_data_files(master: Path) -> list[Path]:
    """The data files the master's ``/entry/data`` links to (none if the master is absent or unreadable)."""
    import h5py

    if not master.is_file():
        return []
    try:
        with h5py.File(master, "r") as handle:
            group = handle.get("entry/data")
            if group is None:
                return []
            links = [group.get(name, getlink=True) for name in group]
    except OSError:
        return []  # the master's own hash in the manifest still records what it is
    return [master.parent / link.filename for link in links if isinstance(link, h5py.ExternalLink)]


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks; raises :class:`Interrupted` when ``stop`` is set."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            if stop is not None and stop.is_set():
                raise Interrupted(str(path))
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(started: dict, ended: dict, stop: threading.Event | None = None) -> dict:
    """The manifest of a collection from its CollectionStarted and CollectionEnded values.

    The images expected are ``min(number_of_images, images_collected)``: an aborted
    collection is archived as what it collected. Files that are not there are listed
    under ``missing`` and make the manifest incomplete. Unreadable files raise OSError.
    """
    n_images = max(0, min(started["number_of_images"], ended["images_collected"]))
    if n_images > MAX_IMAGES:
        raise ManifestError(f"{n_images} images is more than a manifest lists ({MAX_IMAGES})")
    files, missing = [], []
    for path in expected_files(started["file_template"], started.get("start_image_number", 1), n_images):
        path = Path(os.path.abspath(path))
        try:
            size = path.stat().st_size
            files.append({"path": str(path), "size": size, "sha256": sha256_file(path, stop)})
        except FileNotFoundError:
            missing.append(str(path))
    return {
        "format": MANIFEST_FORMAT,
        "dcid": started["dcid"],
        "processing_job_id": started.get("processing_job_id"),
        "beamline": started.get("beamline", ""),
        "file_template": started["file_template"],
        "collection_status": ended.get("status", "success"),
        "images_expected": n_images,
        "complete": not missing,
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
        "missing": missing,
    }


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as written: stable JSON (sorted keys), one trailing newline."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(path: Path, manifest: dict) -> tuple[str, bool]:
    """Write the manifest atomically unless an identical one is there; returns (SHA-256 hex, written?)."""
    data = manifest_bytes(manifest)
    digest = hashlib.sha256(data).hexdigest()
    try:
        if path.read_bytes() == data:
            return digest, False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return digest, True
