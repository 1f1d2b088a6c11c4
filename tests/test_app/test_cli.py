"""The CLI as a person uses it: check-config, send (against a real broker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=60,
    )


def test_check_config_names_every_bad_key(tmp_path: Path) -> None:
    cfg = {
        "kafka": {"partitons": 4},
        "emarsys": {"auth": {"type": "wsse", "username": "u", "secret": "${NOPE_UNSET_VAR}"},
                    "batch_size": 5000},
        "identity": {"primary_key": {"paths": []}},
        "data_map": [{"from": "traits.x", "field_id": 1, "transform": "upper"}],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli("check-config", str(path))
    assert r.returncode == 2
    for key in ("kafka.partitons", "emarsys.auth.secret", "NOPE_UNSET_VAR",
                "emarsys.batch_size", "identity.primary_key.paths", "data_map[0].transform"):
        assert key in r.stderr, (key, r.stderr)


def test_check_config_ok_and_never_prints_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text((ROOT / "examples" / "config.yaml").read_text())
    r = cli("check-config", str(path), env={"EMARSYS_USERNAME": "u",
                                            "EMARSYS_SECRET": "s3cr3t-value-xyz"})
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert "s3cr3t-value-xyz" not in r.stdout + r.stderr


def test_worker_refuses_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kafka: {partitions: zero}\n")
    r = cli("worker", "--config", str(path))
    assert r.returncode == 2
    assert "kafka.partitions" in r.stderr
    assert "emarsys" in r.stderr  # missing required section is named too


async def test_send_produces_every_line_to_the_ingest_topic(
    kafka_broker: Any, tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaConsumer

    lines = [b'{"type": "track", "event": "E", "userId": "u%d"}' % i for i in range(25)]
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    topic = f"cli-send-{tmp_path.name}"
    r = cli("send", str(f), "--bootstrap-servers", kafka_broker.bootstrap_servers,
            "--topic", topic)
    assert r.returncode == 0, r.stderr
    assert "sent 25 events" in r.stdout
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap_servers,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[bytes] = []
    try:
        for _ in range(50):
            batch = await consumer.getmany(timeout_ms=200)
            got.extend(m.value for ms in batch.values() for m in ms)
            if len(got) >= 25:
                break
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(lines)


def test_tune_gc_sets_the_thresholds_and_none_keeps_them() -> None:
    import gc

    from app.cli import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(None)
        assert gc.get_threshold() == before
        tune_gc((12_345, 11, 12))
        assert gc.get_threshold() == (12_345, 11, 12)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
