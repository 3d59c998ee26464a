"""The Debian programs some tests drive (MariaDB, Chromium, kcat, Prometheus), found on PATH.

``scripts/dev-setup`` installs their packages when run as root. Without them, only the tests that
need one fail, each in one line naming the package to install: never a skip, never a traceback.
"""

from __future__ import annotations

import os
import shutil

import pytest

#: The Debian package that ships each program the tests run.
DEBIAN_PACKAGES = {
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-server",  # the client tools come with the server package
    "mariadb-admin": "mariadb-server",
    "chromium": "chromium",
    "kcat": "kcat",
    "prometheus": "prometheus",
    "promtool": "prometheus",
}


def require_program(name: str) -> str:
    """The path of program ``name``, or the test fails at once with the Debian package to install.

    /usr/sbin and /sbin are searched after PATH, as scripts/mariadb does: Debian puts mariadbd there,
    and a non-root login PATH lacks them.
    """
    package = DEBIAN_PACKAGES[name]
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"]))
    if path is None:
        pytest.fail(f"{name} is missing: sudo apt-get install {package} "
                    "(scripts/dev-setup installs it when run as root)", pytrace=False)
    return path
