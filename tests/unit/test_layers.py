"""The layout: one installed top-level name, and imports that only point down the layers.

Layers (README, "Layers"): ground (``diffraction``, ``schemas``, ``errors``) < platform < engine <
services (``streams``, ``producers``, ``connectors``, ``dashboard``) < operations < cli. Nothing in the
product imports the test and benchmark helpers."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"errors": 1, "diffraction": 1, "schemas": 1, "platform": 2, "engine": 3, "streams": 4, "producers": 4,
          "connectors": 4, "dashboard": 4, "operations": 5, "cli": 6, "__main__": 7}
IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.M)


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _product_modules() -> list[tuple[str, Path]]:
    """(dotted name, file) of every module installed under beamstream."""
    folders = {"beamstream": ROOT / "beamstream",
               **{name: ROOT / folder for name, folder in _setuptools()["package-dir"].items()}}
    modules = []
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            modules.append((".".join((package, *parts)).removesuffix(".__init__"), path))
    return modules


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "beamstream" and len(parts) > 1 else None


def test_every_installed_package_is_under_beamstream() -> None:
    config = _setuptools()
    assert all(p == "beamstream" or p.startswith("beamstream.") for p in config["packages"])
    assert set(config["package-dir"]) == {f"beamstream.{n}" for n in
                                          ("diffraction", "schemas", "streams", "producers", "connectors", "dashboard")}


@pytest.mark.parametrize("name", ["streams", "schemas", "dashboard", "connectors", "producers", "diffraction"])
def test_the_design_folders_are_not_importable_on_their_own(name: str, tmp_path: Path) -> None:
    # From outside the checkout, as a user's environment sees the installed package.
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
    done = subprocess.run([sys.executable, "-c", f"import beamstream.{name}"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_imports_only_point_down_the_layers() -> None:
    upward = []
    for module, path in _product_modules():
        mine = _layer(module)
        for imported in IMPORT.findall(path.read_text()):
            theirs = _layer(imported)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {imported}")
    assert upward == []
    assert len(_product_modules()) > 100  # every folder was read


def test_nothing_in_the_product_imports_test_or_benchmark_helpers() -> None:
    helpers = [module for module, path in _product_modules()
               if re.search(r"^\s*(?:from|import)\s+(tests|benchmarks)\b", path.read_text(), re.M)]
    assert helpers == []


def test_tests_and_benchmarks_import_the_installed_names_only() -> None:
    # Run from the checkout, `import schemas` would find the bare folder: a second copy of the module.
    bare = re.compile(r"^\s*(?:from|import)\s+(diffraction|schemas|streams|producers|connectors|dashboard)\b", re.M)
    files = [path for folder in ("tests", "benchmarks") for path in (ROOT / folder).rglob("*.py")]
    offenders = [str(path.relative_to(ROOT)) for path in files if bare.search(path.read_text())]
    assert offenders == []


def test_modules_named_in_strings_are_the_installed_names() -> None:
    # find_spec("producers.go") and a fork server's preload list name modules in strings: a bare name
    # only works run from the checkout, where it would also load a second copy of the module.
    bare = re.compile(r"""["'](diffraction|schemas|streams|producers|connectors|dashboard)\.[a-z_]+["']""")
    offenders = [f"{module}: {match.group(0)}" for module, path in _product_modules()
                 for match in bare.finditer(path.read_text())]
    assert offenders == []
