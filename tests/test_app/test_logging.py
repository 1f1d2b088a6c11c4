"""JSON log formatter and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from app.logging_setup import JsonFormatter, TextFormatter, logging_config, redact, secrets_of
from app.settings import load_settings

SECRET = "s3cr3t-Value-9"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("emarsys_stream.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_line_has_fields_and_extras() -> None:
    line = JsonFormatter().format(_record("hello %s", "world", endpoint="contact", attempts=2))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "hello world"
    assert obj["level"] == "warning"
    assert obj["logger"] == "emarsys_stream.test"
    assert obj["ts"].endswith("+00:00")
    assert obj["endpoint"] == "contact" and obj["attempts"] == 2


def test_json_exception_and_unserialisable_extra() -> None:
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        import sys

        rec = _record("failed", thing=object())
        rec.exc_info = sys.exc_info()
    line = JsonFormatter(secrets=[SECRET]).format(rec)
    obj = json.loads(line)
    assert "RuntimeError" in obj["exc"]
    assert SECRET not in line and "***" in obj["exc"]
    assert obj["thing"].startswith("<object")


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_secret_masked_in_message_args_and_extras(formatter: type) -> None:
    f = formatter(secrets=[SECRET, None, ""])
    line = f.format(_record("token for %s", f"user:{SECRET}", header=f"Basic {SECRET}x"))
    assert SECRET not in line
    assert "***" in line


def test_longer_secret_masked_whole() -> None:
    assert redact("a-abcdef-b", ["abc", "abcdef"]) == "a-***-b"


def test_secrets_of_settings(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "kafka:\n  bootstrap_servers: localhost:9092\n  security_protocol: SASL_PLAINTEXT\n"
        "  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: kafka-pass-1\n"
        "emarsys:\n  auth:\n    type: oauth2\n    client_id: c\n    client_secret: oauth-sec-2\n"
        "identity:\n  primary_key:\n    paths: [traits.email]\n    field_id: 3\n"
        "data_map: []\n"
    )
    try:
        settings = load_settings(cfg)
    except Exception as exc:  # pragma: no cover - config schema drift
        pytest.skip(f"config not accepted: {exc}")
    assert set(secrets_of(settings)) == {"kafka-pass-1", "oauth-sec-2"}


def test_dict_config_routes_third_party_loggers_through_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(logging_config("json", "info", [SECRET]))
        logging.getLogger("faust.worker").info("started with %s", SECRET)
        logging.getLogger("emarsys_stream.x").info("ok", extra={"n": 1})
        logging.getLogger("aiokafka").info("hidden below warning")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = buf.getvalue().splitlines()
    objs = [json.loads(ln) for ln in lines]
    assert [o["logger"] for o in objs] == ["faust.worker", "emarsys_stream.x"]
    assert objs[0]["msg"] == "started with ***"
    assert objs[1]["n"] == 1


def test_bad_format_rejected() -> None:
    with pytest.raises(ValueError):
        logging_config("xml")
