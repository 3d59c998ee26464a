"""The command line as a person uses it: help, one-line errors, JSON, the demo."""

import json
import os
import subprocess
import sys

import pytest


def beamstream(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beamstream", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help_lists_the_commands():
    result = beamstream("--help")
    assert result.returncode == 0
    for command in ("cluster", "topics", "config", "demo"):
        assert command in result.stdout


def test_a_bad_argument_is_one_line_without_traceback():
    result = beamstream("cluster", "sideways")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "invalid choice: 'sideways'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_setting_is_named_in_one_line():
    result = beamstream("config", env={"BEAMSTREAM_LOCAL_KAFKA_PORT": "ninety"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "beamstream config: error: BEAMSTREAM_LOCAL_KAFKA_PORT: expected an integer, got 'ninety'")


@pytest.mark.parametrize(("args", "env", "expected"), [
    (("archiver", "--metrics-port", "70000"), {},
     "beamstream archiver: error: argument --metrics-port: expected a port number (1-65535), got '70000'"),
    (("ispyb-sink",), {"BEAMSTREAM_METRICS_PORT": "nine"},
     "beamstream ispyb-sink: error: BEAMSTREAM_METRICS_PORT: expected a port number, got 'nine'"),
])
def test_a_bad_metrics_port_is_one_line(args, env, expected):
    result = beamstream(*args, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(expected) and result.stderr.count("\n") == 1


def test_config_json_hides_secrets():
    result = beamstream("config", "--json", env={"BEAMSTREAM_SECURITY_PROTOCOL": "SASL_SSL",
                                                 "BEAMSTREAM_SASL_MECHANISM": "PLAIN",
                                                 "BEAMSTREAM_SASL_PASSWORD": "hunter2"})
    values = json.loads(result.stdout)
    assert values["sasl_password"] == "(set)"
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.kafka
def test_topics_list_json_against_the_broker(kafka_settings):
    env = {"BEAMSTREAM_BOOTSTRAP_SERVERS": kafka_settings.kafka_bootstrap,
           "BEAMSTREAM_TOPIC_PREFIX": kafka_settings.topic_prefix, "BEAMSTREAM_IMAGE_PARTITIONS": "4"}
    rows = json.loads(beamstream("topics", "list", "--json", env=env).stdout)
    assert {r["topic"] for r in rows} >= {f"{kafka_settings.topic_prefix}images"}
    assert all(r["partitions"] == r["declared_partitions"] for r in rows)
