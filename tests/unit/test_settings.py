"""Settings: defaults, environment, config file, and errors that name the setting."""

from pathlib import Path

import pytest

from beamstream.errors import SettingError
from beamstream.platform.settings import load_settings


def test_defaults_point_at_the_local_cluster_and_embedded_database(tmp_path):
    settings = load_settings(environ={}, home=tmp_path)
    assert settings.uses_local_cluster
    assert settings.kafka_bootstrap == "127.0.0.1:39092"
    assert settings.database_url == f"sqlite:///{tmp_path / 'ispyb.sqlite'}"
    assert settings.schema_registry_url == ""
    assert settings.image_partitions >= 12


def test_environment_overrides_and_external_cluster():
    settings = load_settings(environ={
        "BEAMSTREAM_BOOTSTRAP_SERVERS": "kafka1:9092,kafka2:9092",
        "BEAMSTREAM_SECURITY_PROTOCOL": "sasl_ssl",
        "BEAMSTREAM_SASL_MECHANISM": "scram-sha-512",
        "BEAMSTREAM_SASL_USERNAME": "beamline",
        "BEAMSTREAM_SASL_PASSWORD": "s3cret",
        "BEAMSTREAM_DATA_ROOTS": "/dls/i03/data:/dls/i04/data",
        "BEAMSTREAM_IMAGE_PARTITIONS": "24",
    })
    assert not settings.uses_local_cluster
    config = settings.kafka_client_config()
    assert config["bootstrap.servers"] == "kafka1:9092,kafka2:9092"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.password"] == "s3cret"
    assert settings.data_roots == ("/dls/i03/data", "/dls/i04/data")
    assert settings.image_partitions == 24
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BEAMSTREAM_LOCAL_KAFKA_PORT", "abc", "BEAMSTREAM_LOCAL_KAFKA_PORT: expected an integer"),
        ("BEAMSTREAM_LOCAL_KAFKA_PORT", "70000", "BEAMSTREAM_LOCAL_KAFKA_PORT: must be between"),
        ("BEAMSTREAM_SECURITY_PROTOCOL", "TLS", "BEAMSTREAM_SECURITY_PROTOCOL: must be one of"),
        ("BEAMSTREAM_BOOTSTRAP_SERVERS", "kafka-without-port", "BEAMSTREAM_BOOTSTRAP_SERVERS: expected host:port"),
        ("BEAMSTREAM_SCHEMA_REGISTRY_URL", "registry:8081", "BEAMSTREAM_SCHEMA_REGISTRY_URL: expected an http"),
        ("BEAMSTREAM_CONFIG", "/no/such/file.toml", "BEAMSTREAM_CONFIG: no such file"),
    ],
)
def test_a_wrong_setting_is_named(variable, value, expected):
    with pytest.raises(SettingError, match=expected):
        load_settings(environ={variable: value})


def test_sasl_mechanism_without_sasl_protocol_is_refused():
    with pytest.raises(SettingError, match="BEAMSTREAM_SECURITY_PROTOCOL"):
        load_settings(environ={"BEAMSTREAM_SASL_MECHANISM": "PLAIN"})


def test_config_file_and_password_file(tmp_path: Path):
    config = tmp_path / "beamstream.toml"
    config.write_text('[beamstream]\nbootstrap_servers = "broker:9093"\ntopic_prefix = "i03."\n'
                      'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\n')
    secret = tmp_path / "password"
    secret.write_text("from-a-file\n")
    settings = load_settings(environ={
        "BEAMSTREAM_CONFIG": str(config),
        "BEAMSTREAM_SASL_PASSWORD_FILE": str(secret),
        "BEAMSTREAM_TOPIC_PREFIX": "env-wins.",
    })
    assert settings.bootstrap_servers == "broker:9093"
    assert settings.topic_prefix == "env-wins."
    assert settings.sasl_password == "from-a-file"


def test_unknown_key_in_config_file_is_named(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('bootstrap_server = "typo:9092"\n')
    with pytest.raises(SettingError, match="unknown setting 'bootstrap_server'"):
        load_settings(environ={"BEAMSTREAM_CONFIG": str(config)})
