"""The science tests' reference data: absent on a workstation it skips them, absent in CI it fails them."""

from __future__ import annotations

import pytest

from tests.helpers.spotfinding_data import missing_data


def test_missing_reference_data_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI needs ../shared/data"):
        missing_data(tmp_path / "absent")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="reference data missing"):
        missing_data(tmp_path / "absent")
