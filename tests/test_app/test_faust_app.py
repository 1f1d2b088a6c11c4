"""Settings -> Faust/aiokafka settings, incl. TLS and SASL credentials (no broker needed)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust
import pytest

from app.faust_app import _credentials, build_runtime, faust_settings
from app.settings import ConfigError, settings_from_mapping
from app.topics_admin import _admin_kwargs


def cfg(**kafka: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "b1:9092,b2:9092", **kafka},
        "emarsys": {"auth": {"type": "wsse", "username": "u", "secret": "s"}},
        "identity": {"primary_key": {"paths": ["traits.email"]}},
    }


def test_plaintext_has_no_credentials_and_lists_every_broker() -> None:
    s = settings_from_mapping(cfg())
    fs = faust_settings(s)
    assert fs["broker"] == ["kafka://b1:9092", "kafka://b2:9092"]
    assert fs["broker_credentials"] is None
    assert fs["consumer_auto_offset_reset"] == "earliest"


def test_sasl_ssl_scram_builds_sasl_credentials_with_tls(tmp_path: Path) -> None:
    # Confluent Cloud / MSK style: SASL_SSL + SCRAM, password from the environment.
    ca = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    if not ca.exists():
        pytest.skip("no system CA bundle")
    s = settings_from_mapping(
        cfg(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
            sasl_username="svc", sasl_password="${KAFKA_PW}", ssl_cafile=str(ca)),
        env={"KAFKA_PW": "pw-from-env"},
    )
    creds = _credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "svc" and creds.password == "pw-from-env"
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.protocol.value == "SASL_SSL"
    assert isinstance(creds.ssl_context, ssl.SSLContext)
    admin = _admin_kwargs(build_runtime(s, agents=False))
    assert admin["security_protocol"] == "SASL_SSL"
    assert admin["sasl_mechanism"] == "SCRAM-SHA-512"
    assert admin["sasl_plain_password"] == "pw-from-env"
    assert isinstance(admin["ssl_context"], ssl.SSLContext)
    assert "pw-from-env" not in repr(s)


def test_sasl_without_password_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(cfg(security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                                  sasl_username="svc"))
    assert any(e.startswith("kafka.sasl_password") for e in err.value.errors), err.value.errors


def test_every_documented_topic_is_declared_with_the_configured_partitions() -> None:
    s = settings_from_mapping(cfg(partitions=6, topic_prefix="es"))
    rt = build_runtime(s, agents=False)
    names = {t.get_topic_name(): t for t in vars(rt.topics).values()}
    assert set(names) == {
        "segment.events", "segment.events.dlq", "es.identity", "es.contact-events",
        "es.emarsys-operations", "es.emarsys-results", "es.emarsys-dlq", "es.rule-matches",
        "es.late-events",
    }
    assert {t.partitions for t in names.values()} == {6}


async def test_fetch_max_wait_reaches_the_workers_aiokafka_consumer() -> None:
    # Faust builds its consumer with a fixed fetch_max_wait_ms=1500; the setting replaces it.
    # (Built, not started: aiokafka connects only in start().)
    def consumer_wait(worker: dict[str, Any]) -> int:
        s = settings_from_mapping({**cfg(), "worker": worker})
        rt = build_runtime(s, agents=False)
        thread = rt.app.consumer._thread  # type: ignore[attr-defined]
        consumer = thread._create_worker_consumer(rt.app.transport)
        return int(consumer._fetch_max_wait_ms)

    assert consumer_wait({"fetch_max_wait_ms": 50}) == 50
    assert consumer_wait({}) == 1500


def test_fetch_max_wait_is_validated_with_its_key() -> None:
    with pytest.raises(ConfigError, match="worker.fetch_max_wait_ms"):
        settings_from_mapping({**cfg(), "worker": {"fetch_max_wait_ms": 0}})
