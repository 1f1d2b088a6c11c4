"""Tests for app.settings and app.durations (real YAML files in tmp_path)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.durations import DurationError, parse_duration
from app.settings import (
    DEFAULT_API_URL,
    DEFAULT_OAUTH2_API_URL,
    DEFAULT_TOKEN_URL,
    ConfigError,
    DataMapping,
    OAuth2Auth,
    Settings,
    WsseAuth,
    expand_env,
    load_settings,
    redacted_dict,
    settings_from_mapping,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"
SECRET = "s3cr3t-Value-42"
ENV = {"EMARSYS_USERNAME": "acme001", "EMARSYS_SECRET": SECRET}

MINIMAL = """\
emarsys:
  auth:
    type: wsse
    username: ${EMARSYS_USERNAME}
    secret: ${EMARSYS_SECRET}
identity:
  primary_key:
    paths: [traits.email]
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def minimal() -> dict[str, Any]:
    return {
        "emarsys": {"auth": {"type": "wsse", "username": "u", "secret": SECRET}},
        "identity": {"primary_key": {"paths": ["traits.email"]}},
    }


def errors_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, env or {})
    return info.value.errors


def merged(**sections: Any) -> dict[str, Any]:
    data = minimal()
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        (" 1.5 s ", 1.5),
        ("2H", 7200.0),
        ("10", 10.0),
        ("0.25", 0.25),
        (0, 0.0),
        (3, 3.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", ["", "abc", "5x", "m5", "1.2.3s", "5 m s", "nan", "inf"])
def test_parse_duration_rejects_garbage(value: str) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, "-5s", "-3"])
def test_parse_duration_rejects_negative(value: str | float) -> None:
    with pytest.raises(DurationError, match="must not be negative"):
        parse_duration(value)


def test_parse_duration_rejects_bool_and_non_finite() -> None:
    with pytest.raises(DurationError):
        parse_duration(True)
    with pytest.raises(DurationError, match="finite"):
        parse_duration(float("inf"))


def test_durations_in_settings() -> None:
    data = merged(
        emarsys={"flush_interval": "500ms", "request_timeout": 10, "max_retry_backoff": "2m"},
        identity={"hold_expiry": "2d"},
        dedupe={"window": "1h"},
    )
    settings = settings_from_mapping(data, {})
    assert settings.emarsys.flush_interval == 0.5
    assert settings.emarsys.request_timeout == 10.0
    assert settings.emarsys.max_retry_backoff == 120.0
    assert settings.identity.hold_expiry == 172800.0
    assert settings.dedupe.window == 3600.0


def test_bad_durations_name_the_key() -> None:
    errors = errors_of(
        merged(emarsys={"flush_interval": "soon", "request_timeout": "-1s"},
               dedupe={"window": [1]})
    )
    assert any(e.startswith("emarsys.flush_interval: invalid duration 'soon'") for e in errors)
    assert any(e.startswith("emarsys.request_timeout: duration must not be negative")
               for e in errors)
    assert any(e.startswith("dedupe.window: expected a duration") for e in errors)
    assert len(errors) == 3


def test_zero_flush_interval_rejected() -> None:
    assert errors_of(merged(emarsys={"flush_interval": 0})) == [
        "emarsys.flush_interval: must be > 0 (got 0)"
    ]


# ---------------------------------------------------------------------------- valid configs


def test_minimal_file_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env=ENV)
    assert isinstance(settings, Settings)
    kafka = settings.kafka
    assert kafka.bootstrap_servers is None
    assert kafka.ingest_topic == "segment.events"
    assert kafka.dead_letter_topic == "segment.events.dlq"
    assert kafka.partitions == 8
    assert kafka.topic_prefix == "emarsys-stream"
    assert kafka.replication_factor == 1
    assert kafka.app_id == "emarsys-stream"
    assert kafka.security_protocol == "PLAINTEXT"
    assert kafka.sasl_mechanism is None and kafka.sasl_password is None
    assert kafka.ssl_cafile is None
    emarsys = settings.emarsys
    assert emarsys.api_url == DEFAULT_API_URL == "https://api.emarsys.net/api/v2/"
    assert isinstance(emarsys.auth, WsseAuth)
    assert emarsys.auth.username == "acme001"
    assert emarsys.auth.secret.get_secret_value() == SECRET
    assert emarsys.requests_per_minute == 1000
    assert emarsys.batch_size == 1000
    assert emarsys.flush_interval == 1.0
    assert emarsys.request_timeout == 30.0
    assert emarsys.max_retry_backoff == 60.0
    identity = settings.identity
    assert identity.primary_key.paths == ["traits.email"]
    assert identity.primary_key.field_id == 3
    assert identity.primary_key.normalize == ["trim", "lowercase"]
    assert identity.max_ids_per_user == 50
    assert identity.hold_max_per_id == 1000
    assert identity.hold_expiry == 7 * 86400.0
    assert settings.dedupe.window == 86400.0
    assert settings.data_map == []
    assert settings.web.host == "127.0.0.1"
    assert settings.web.port == 6066
    assert settings.store == "rocksdb://"
    assert settings.data_dir == "./data"
    assert settings.rules == [] and settings.rule_engine == {} and settings.audiences == []
    assert settings.topic("by-email") == "emarsys-stream.by-email"


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE, env=ENV)
    assert settings.kafka.bootstrap_servers is None  # `run` uses the embedded broker
    assert isinstance(settings.emarsys.auth, WsseAuth)
    assert settings.emarsys.auth.username == "acme001"
    assert settings.emarsys.auth.secret.get_secret_value() == SECRET
    assert settings.identity.primary_key.paths == [
        "traits.email",
        "context.traits.email",
        "properties.email",
    ]
    assert [(m.from_, m.field_id, m.transform) for m in settings.data_map] == [
        (["traits.firstName"], 1, None),
        (["traits.lastName"], 2, None),
        (["traits.optIn", "context.traits.optIn"], 31, "optin"),
        (["traits.birthday"], 4, "date"),
    ]
    assert settings.identity.hold_expiry == 7 * 86400.0
    assert settings.dedupe.window == 86400.0


def test_example_config_needs_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(EXAMPLE, env={})
    assert info.value.errors == [
        "emarsys.auth.username: environment variable EMARSYS_USERNAME is not set",
        "emarsys.auth.secret: environment variable EMARSYS_SECRET is not set",
    ]


def test_data_map_from_string_or_list() -> None:
    data = merged(
        data_map=[
            {"from": "traits.firstName", "field_id": 1},
            {"from": ["traits.optIn", "context.traits.optIn"], "field_id": 31,
             "transform": "optin", "allow_empty": True},
        ]
    )
    settings = settings_from_mapping(data, {})
    first, second = settings.data_map
    assert first.from_ == ["traits.firstName"] and first.transform is None
    assert first.allow_empty is False
    assert second.from_ == ["traits.optIn", "context.traits.optIn"]
    assert second.transform == "optin" and second.allow_empty is True
    assert redacted_dict(settings)["data_map"][0]["from"] == ["traits.firstName"]
    assert DataMapping(from_=["a"], field_id=5).from_ == ["a"]


def test_oauth2_auth_and_api_url_default() -> None:
    auth = {"type": "oauth2", "client_id": "cid", "client_secret": SECRET}
    settings = settings_from_mapping(merged(emarsys={"auth": auth}), {})
    assert isinstance(settings.emarsys.auth, OAuth2Auth)
    assert settings.emarsys.auth.client_id == "cid"
    assert settings.emarsys.auth.client_secret.get_secret_value() == SECRET
    assert settings.emarsys.auth.token_url == DEFAULT_TOKEN_URL
    assert settings.emarsys.api_url == DEFAULT_OAUTH2_API_URL

    explicit = merged(emarsys={"auth": auth, "api_url": "http://127.0.0.1:8080/api/v2"})
    settings = settings_from_mapping(explicit, {})
    assert settings.emarsys.api_url == "http://127.0.0.1:8080/api/v2/"  # slash added


def test_sasl_ssl_valid(tmp_path: Path) -> None:
    cafile = write(tmp_path, "ca", "ca.pem")
    kafka = {
        "bootstrap_servers": "k1:9093, k2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "svc",
        "sasl_password": "${KAFKA_PASSWORD}",
        "ssl_cafile": str(cafile),
    }
    settings = settings_from_mapping(merged(kafka=kafka), {"KAFKA_PASSWORD": "pw-123456"})
    assert settings.kafka.bootstrap_servers == "k1:9093,k2:9093"
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "pw-123456"
    assert "pw-123456" not in repr(settings)


def test_null_sections_mean_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "kafka:\nweb:\ndata_map:\n")
    settings = load_settings(path, env=ENV)
    assert settings.kafka.partitions == 8
    assert settings.web.port == 6066
    assert settings.data_map == []


def test_input_mapping_not_modified() -> None:
    data = minimal()
    data["emarsys"]["auth"]["secret"] = "${S}"
    settings_from_mapping(data, {"S": "x", "KAFKA_BOOTSTRAP_SERVERS": "h:1"})
    assert data["emarsys"]["auth"]["secret"] == "${S}"
    assert "kafka" not in data


# ---------------------------------------------------------------------------- env vars


def test_env_expansion_everywhere() -> None:
    data = merged(
        kafka={"ingest_topic": "${PREFIX}.events", "partitions": "${PARTS}"},
        identity={"primary_key": {"paths": ["${KEY_PATH}", "properties.email"]}},
        web={"host": "${HOST:-0.0.0.0}", "port": "${PORT:-7000}"},
        data_dir="${HOME_DIR}/data",
    )
    env = {"PREFIX": "acme", "PARTS": "4", "KEY_PATH": "traits.email", "PORT": "",
           "HOME_DIR": "/srv"}
    settings = settings_from_mapping(data, env)
    assert settings.kafka.ingest_topic == "acme.events"
    assert settings.kafka.partitions == 4
    assert settings.identity.primary_key.paths == ["traits.email", "properties.email"]
    assert settings.web.host == "0.0.0.0"
    assert settings.web.port == 7000  # empty var -> default, as in the shell
    assert settings.data_dir == "/srv/data"


def test_env_literal_dollar() -> None:
    data = merged(data_dir="$${NOT_A_VAR}/x$y$$z")
    assert settings_from_mapping(data, {}).data_dir == "${NOT_A_VAR}/x$y$$z"


def test_unset_env_var_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL), env={"EMARSYS_USERNAME": "u"})
    assert info.value.errors == [
        "emarsys.auth.secret: environment variable EMARSYS_SECRET is not set"
    ]
    assert "emarsys.auth.secret: environment variable EMARSYS_SECRET is not set" in str(
        info.value
    )


def test_env_errors_in_lists_and_bad_references() -> None:
    data = merged(
        identity={"primary_key": {"paths": ["traits.email", "${MISSING}"]}},
        data_dir="${not valid}",
        store="${UNTERMINATED",
    )
    assert errors_of(data) == [
        "identity.primary_key.paths[1]: environment variable MISSING is not set",
        "data_dir: invalid environment variable reference (expected ${NAME} or "
        "${NAME:-default}; write '$${' for a literal '${')",
        "store: unterminated '${' (write '$${' for a literal '${')",
    ]


def test_env_errors_reported_with_validation_errors() -> None:
    data = merged(kafka={"partitions": 0})
    data["emarsys"]["auth"]["secret"] = "${EMARSYS_SECRET}"
    assert errors_of(data) == [
        "emarsys.auth.secret: environment variable EMARSYS_SECRET is not set",
        "kafka.partitions: must be >= 1 (got 0)",
    ]


def test_expand_env_helper() -> None:
    expanded, errors = expand_env({"a": ["${X}", 1, {"b": "${Y:-d}"}]}, {"X": "x"})
    assert expanded == {"a": ["x", 1, {"b": "d"}]}
    assert errors == []


def test_bootstrap_servers_env_override(tmp_path: Path) -> None:
    text = MINIMAL + "kafka:\n  bootstrap_servers: file-host:9092\n"
    path = write(tmp_path, text)
    assert load_settings(path, env=ENV).kafka.bootstrap_servers == "file-host:9092"
    env = {**ENV, "KAFKA_BOOTSTRAP_SERVERS": "env-host:9092"}
    assert load_settings(path, env=env).kafka.bootstrap_servers == "env-host:9092"
    # Also without a kafka section, and an empty variable does not override.
    assert settings_from_mapping(minimal(), env).kafka.bootstrap_servers == "env-host:9092"
    env_empty = {**ENV, "KAFKA_BOOTSTRAP_SERVERS": ""}
    assert load_settings(path, env=env_empty).kafka.bootstrap_servers == "file-host:9092"


def test_bootstrap_override_replaces_unset_variable() -> None:
    data = merged(kafka={"bootstrap_servers": "${BROKERS}"})
    settings = settings_from_mapping(data, {"KAFKA_BOOTSTRAP_SERVERS": "h:1"})
    assert settings.kafka.bootstrap_servers == "h:1"


def test_load_settings_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMARSYS_USERNAME", "from-os")
    monkeypatch.setenv("EMARSYS_SECRET", SECRET)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    settings = load_settings(str(write(tmp_path, MINIMAL)))
    assert isinstance(settings.emarsys.auth, WsseAuth)
    assert settings.emarsys.auth.username == "from-os"


# ---------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    assert info.value.errors == [f"{path}: file not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, env=ENV)
    assert info.value.errors == [f"{tmp_path}: is a directory, not a file"]


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "emarsys:\n  auth: [unclosed\nidentity: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:3:")
    assert "invalid YAML" in error


def test_yaml_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, f"emarsys:\n  auth:\n    secret: {SECRET}\n   bad: indent\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:4:")
    assert SECRET not in str(info.value)


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "web:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:")
    assert "duplicate key 'port'" in error


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "- a\n- b\n"), env=ENV)
    assert info.value.errors == [
        f"{tmp_path / 'config.yaml'}: expected a mapping of settings at the top level, got list"
    ]


def test_empty_file_reports_missing_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "# nothing\n"), env=ENV)
    assert info.value.errors == [
        "emarsys: missing required key",
        "identity: missing required key",
    ]
    assert str(tmp_path / "config.yaml") in str(info.value)


# ---------------------------------------------------------------------------- validation errors


def test_unknown_keys() -> None:
    data = merged(kafka={"partitons": 4}, colour="blue")
    data["emarsys"]["auth"]["usename"] = "x"
    data["data_map"] = [{"from": "a", "field_id": 1, "tranform": "trim"}]
    errors = errors_of(data)
    assert "kafka.partitons: unknown key (did you mean 'partitions'?)" in errors
    assert "emarsys.auth.usename: unknown key (did you mean 'username'?)" in errors
    assert "data_map[0].tranform: unknown key (did you mean 'transform'?)" in errors
    assert any(e.startswith("colour: unknown key (allowed keys: kafka, emarsys") for e in errors)
    assert len(errors) == 4


def test_wrong_types_name_expected_type() -> None:
    data = merged(
        kafka={"partitions": "eight", "ingest_topic": 5},
        web={"port": 1.5},
        data_map=[{"from": "a", "field_id": 1, "allow_empty": "maybe"}],
        identity={"primary_key": {"paths": "traits.email"}},
        dedupe=[],
    )
    errors = errors_of(data)
    assert errors == [
        "kafka.ingest_topic: expected a string, got integer 5",
        "kafka.partitions: expected an integer, got string 'eight'",
        "identity.primary_key.paths: expected a list, got string 'traits.email'",
        "dedupe: expected a mapping, got list",
        "data_map[0].allow_empty: expected a boolean (true or false), got string 'maybe'",
        "web.port: expected a whole number, got number 1.5",
    ]


def test_missing_required_keys() -> None:
    data = {"emarsys": {"auth": {"type": "wsse"}}, "identity": {"primary_key": {}},
            "data_map": [{"from": "a"}]}
    assert errors_of(data) == [
        "emarsys.auth.username: missing required key",
        "emarsys.auth.secret: missing required key",
        "identity.primary_key.paths: missing required key",
        "data_map[0].field_id: missing required key",
    ]


def test_auth_type_errors() -> None:
    assert errors_of(merged(emarsys={"auth": {"username": "u", "secret": "x"}})) == [
        "emarsys.auth.type: missing required key (expected one of: wsse, oauth2)"
    ]
    assert errors_of(merged(emarsys={"auth": {"type": "basic"}})) == [
        "emarsys.auth.type: unknown auth type 'basic' (expected one of: wsse, oauth2)"
    ]
    assert errors_of(merged(emarsys={"auth": {"type": "oauth2", "client_id": "c"}})) == [
        "emarsys.auth.client_secret: missing required key"
    ]
    assert errors_of(merged(emarsys={"auth": "wsse"})) == [
        "emarsys.auth: expected a mapping, got string 'wsse'"
    ]


def test_bad_values() -> None:
    data = merged(
        kafka={"partitions": 0, "replication_factor": -1, "security_protocol": "TLS",
               "ingest_topic": "bad topic!"},
        emarsys={"batch_size": 1001, "requests_per_minute": 0, "api_url": "ftp://x"},
        identity={"primary_key": {"paths": [], "field_id": 0, "normalize": ["upper"]}},
        data_map=[{"from": [], "field_id": -2, "transform": "foo"}],
        web={"port": 70000},
        store="redis://",
    )
    errors = errors_of(data)
    assert errors == [
        "kafka.ingest_topic: invalid name 'bad topic!' (1-249 characters: letters, digits, "
        "'.', '_', '-')",
        "kafka.partitions: must be >= 1 (got 0)",
        "kafka.replication_factor: must be >= 1 (got -1)",
        "kafka.security_protocol: unknown security protocol 'TLS' (expected one of "
        "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL')",
        "emarsys.api_url: invalid URL 'ftp://x' (expected http://... or https://...)",
        "emarsys.requests_per_minute: must be >= 1 (got 0)",
        "emarsys.batch_size: must be <= 1000 (got 1001)",
        "identity.primary_key.paths: must not be empty",
        "identity.primary_key.field_id: must be > 0 (got 0)",
        "identity.primary_key.normalize[0]: unknown normalization 'upper' (expected one of "
        "'trim' or 'lowercase')",
        "data_map[0].from: must not be empty",
        "data_map[0].field_id: must be > 0 (got -2)",
        "data_map[0].transform: unknown transform 'foo' (expected one of 'string', 'number', "
        "'lowercase', 'trim', 'date' or 'optin')",
        "web.port: must be <= 65535 (got 70000)",
        "store: unsupported store 'redis://' (expected 'rocksdb://' or 'memory://')",
    ]


def test_batch_size_bounds() -> None:
    assert settings_from_mapping(merged(emarsys={"batch_size": 1}), {}).emarsys.batch_size == 1
    assert errors_of(merged(emarsys={"batch_size": 0})) == [
        "emarsys.batch_size: must be >= 1 (got 0)"
    ]


def test_data_map_from_wrong_type() -> None:
    data = merged(data_map=[{"from": 7, "field_id": 1}, {"from": ["a", 3], "field_id": 2}])
    assert errors_of(data) == [
        "data_map[0].from: expected a string or a list of strings, got integer",
        "data_map[1].from[1]: expected a string, got integer 3",
    ]


def test_duplicate_field_ids_name_the_index() -> None:
    data = merged(
        data_map=[
            {"from": "traits.firstName", "field_id": 1},
            {"from": "traits.lastName", "field_id": 2},
            {"from": "traits.name", "field_id": 1},
            {"from": "traits.surname", "field_id": 2},
        ]
    )
    assert errors_of(data) == [
        "data_map[2].field_id: duplicate field_id 1 (already mapped by data_map[0])",
        "data_map[3].field_id: duplicate field_id 2 (already mapped by data_map[1])",
    ]


def test_data_map_cannot_map_the_key_field() -> None:
    data = merged(data_map=[{"from": "traits.email", "field_id": 3}])
    (error,) = errors_of(data)
    assert error.startswith("data_map[0].field_id: field 3 is the contact key")


def test_sasl_needs_mechanism_and_credentials() -> None:
    errors = errors_of(merged(kafka={"security_protocol": "SASL_PLAINTEXT"}))
    assert errors == [
        "kafka.sasl_mechanism: required when security_protocol is SASL_PLAINTEXT",
        "kafka.sasl_username: required when security_protocol is SASL_PLAINTEXT",
        "kafka.sasl_password: required when security_protocol is SASL_PLAINTEXT",
    ]
    errors = errors_of(
        merged(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI",
                      "sasl_username": "u", "sasl_password": "p"})
    )
    assert errors == [
        "kafka.sasl_mechanism: unknown SASL mechanism 'GSSAPI' (expected one of 'PLAIN', "
        "'SCRAM-SHA-256' or 'SCRAM-SHA-512')"
    ]


def test_sasl_and_ssl_options_need_matching_protocol(tmp_path: Path) -> None:
    cafile = write(tmp_path, "ca", "ca.pem")
    errors = errors_of(
        merged(kafka={"sasl_username": "u", "ssl_cafile": str(cafile)})
    )
    assert errors == [
        "kafka.sasl_username: only allowed when security_protocol is SASL_PLAINTEXT or "
        "SASL_SSL (it is PLAINTEXT)",
        "kafka.ssl_cafile: only allowed when security_protocol is SSL or SASL_SSL "
        "(it is PLAINTEXT)",
    ]


def test_ssl_files_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    errors = errors_of(
        merged(kafka={"security_protocol": "SSL", "ssl_cafile": str(missing),
                      "ssl_keyfile": str(tmp_path)})
    )
    assert errors == [
        f"kafka.ssl_cafile: file not found: {missing}",
        f"kafka.ssl_keyfile: file not found: {tmp_path}",
        "kafka.ssl_keyfile: requires kafka.ssl_certfile",
    ]


def test_several_errors_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        kafka:
          partitons: 3
          partitions: zero
        emarsys:
          batch_size: 5000
          auth:
            type: wsse
            username: u
            secret: ${EMARSYS_SECRET}
        identity:
          primary_key:
            paths: []
        data_map:
          - from: traits.firstName
            field_id: 1
            transform: foo
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.errors == [
        "emarsys.auth.secret: environment variable EMARSYS_SECRET is not set",
        "kafka.partitions: expected an integer, got string 'zero'",
        "kafka.partitons: unknown key (did you mean 'partitions'?)",
        "emarsys.batch_size: must be <= 1000 (got 5000)",
        "identity.primary_key.paths: must not be empty",
        "data_map[0].transform: unknown transform 'foo' (expected one of 'string', 'number', "
        "'lowercase', 'trim', 'date' or 'optin')",
    ]
    message = str(info.value)
    assert message.startswith(f"invalid configuration in {path} (6 errors):")
    for error in info.value.errors:
        assert error in message


# ---------------------------------------------------------------------------- secrets


def test_secrets_not_in_repr_or_redacted_dict(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env=ENV)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.emarsys.auth)
    redacted = redacted_dict(settings)
    assert SECRET not in repr(redacted)
    assert redacted["emarsys"]["auth"]["secret"] == "**********"
    assert redacted["emarsys"]["auth"]["username"] == "acme001"
    assert redacted["kafka"]["partitions"] == 8


def test_secret_values_never_echoed_in_errors() -> None:
    data = merged(
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
               "sasl_username": "u", "sasl_password": 12345678},
        emarsys={"auth": {"type": "oauth2", "client_id": "c", "client_secret": 98765432,
                          "token_url": "not-a-url-with-secret"}},
    )
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, {})
    text = str(info.value)
    assert info.value.errors == [
        "kafka.sasl_password: expected a string, got integer",
        "emarsys.auth.client_secret: expected a string, got integer",
        "emarsys.auth.token_url: invalid URL *** (expected http://... or https://...)",
    ]
    for value in ("12345678", "98765432", "not-a-url-with-secret"):
        assert value not in text
        assert value not in repr(info.value)


def test_secret_not_in_error_when_other_keys_fail(tmp_path: Path) -> None:
    text = MINIMAL + "kafka:\n  partitions: -1\n  oops: 1\n"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env=ENV)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    assert SECRET not in "\n".join(info.value.errors)


def test_config_error_type() -> None:
    error = ConfigError(["a.b: bad"])
    assert isinstance(error, Exception)
    assert error.errors == ["a.b: bad"]
    assert "a.b: bad" in str(error)
    assert ConfigError("x: y").errors == ["x: y"]


def test_worker_tuning_for_envelopes_gc_and_dedupe() -> None:
    s = Settings.model_validate(merged())
    assert s.worker.gc_thresholds == (200_000, 50, 100)
    assert s.worker.envelope_buffer_maxsize == 64
    assert s.dedupe.max_ids_per_contact == 1000
    assert s.ingest_group == f"{s.kafka.app_id}-ingest"
    off = Settings.model_validate(merged(worker={"gc_thresholds": None}))
    assert off.worker.gc_thresholds is None
    errors = errors_of(
        merged(worker={"gc_thresholds": [1000, 0, 10], "envelope_buffer_maxsize": 0},
               dedupe={"max_ids_per_contact": 0})
    )
    assert "worker.gc_thresholds[1]: must be >= 1 (got 0)" in errors, errors
    assert any(e.startswith("worker.envelope_buffer_maxsize:") for e in errors), errors
    assert any(e.startswith("dedupe.max_ids_per_contact:") for e in errors), errors


def test_rocksdb_memory_per_store() -> None:
    s = Settings.model_validate(merged())
    w = s.worker
    assert (w.rocksdb_block_cache_mb, w.rocksdb_write_buffer_mb, w.rocksdb_write_buffers) == (
        8, 16, 2
    )
    errors = errors_of(merged(worker={"rocksdb_block_cache_mb": 0, "rocksdb_write_buffers": 1,
                                      "rocksdb_write_buffer_mb": "lots"}))
    for key in ("rocksdb_block_cache_mb", "rocksdb_write_buffers", "rocksdb_write_buffer_mb"):
        assert any(e.startswith(f"worker.{key}:") for e in errors), (key, errors)


def test_rocksdb_write_ahead_log_is_off_unless_asked_for() -> None:
    assert Settings.model_validate(merged()).worker.rocksdb_wal is False
    on = Settings.model_validate(merged(worker={"rocksdb_wal": True}))
    assert on.worker.rocksdb_wal is True
    errors = errors_of(merged(worker={"rocksdb_wal": "sometimes"}))
    assert any(e.startswith("worker.rocksdb_wal:") for e in errors), errors
