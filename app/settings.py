"""Configuration: a YAML file validated by pydantic models that mirror it key for key.

Public API:

- `load_settings(path, env=None)` reads a YAML file and returns `Settings`.
- `settings_from_mapping(data, env=None)` does the same for an already parsed mapping.
- `ConfigError` (with ``.errors``: ``"dotted.key.path: message"`` strings) for every problem:
  unreadable file, YAML syntax, unset environment variables and all validation errors at once.
- `redacted_dict(settings)` is the configuration as plain data with secrets masked, for logs.

Processing order: ``${VAR}`` / ``${VAR:-default}`` in every string value is expanded from the
environment (``$${`` writes a literal ``${``), then ``KAFKA_BOOTSTRAP_SERVERS`` (when set and
non-empty) overrides ``kafka.bootstrap_servers``, then the models validate. Secrets are
`SecretStr` and no error message ever echoes the value of a key whose name contains
"secret", "password" or "token".
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.audiences import KEY_PLACEHOLDER, WILDCARD, snake_case
from app.durations import Duration, parse_duration

__all__ = [
    "AudienceMapping",
    "DEFAULT_API_URL",
    "DEFAULT_OAUTH2_API_URL",
    "DEFAULT_TOKEN_URL",
    "TRANSFORMS",
    "AuthSettings",
    "ConfigError",
    "DataMapping",
    "DedupeSettings",
    "EmarsysSettings",
    "IdentitySettings",
    "KafkaSettings",
    "OAuth2Auth",
    "PrimaryKeySettings",
    "Settings",
    "Transform",
    "WebSettings",
    "WsseAuth",
    "expand_env",
    "load_settings",
    "redacted_dict",
    "settings_from_mapping",
]

DEFAULT_API_URL = "https://api.emarsys.net/api/v2/"
DEFAULT_OAUTH2_API_URL = "https://api.emarsys.net/api/v3/"
DEFAULT_TOKEN_URL = "https://auth.emarsys.net/oauth2/token"

#: Environment variable that overrides ``kafka.bootstrap_servers``.
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"

Transform = Literal["string", "number", "lowercase", "trim", "date", "optin"]
TRANSFORMS: tuple[str, ...] = get_args(Transform)

Normalization = Literal["trim", "lowercase"]
_DEFAULT_NORMALIZE: tuple[Normalization, ...] = ("trim", "lowercase")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_SECRET_WORDS = ("secret", "password", "token")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_STORES = ("rocksdb://", "memory://")

# Error type whose ctx carries several (sub-location, message) pairs; see `_config_errors`.
_MULTI_ERROR = "config_errors"


# --------------------------------------------------------------------------------------
# errors


class ConfigError(Exception):
    """Invalid configuration. ``errors`` holds one ``"dotted.key.path: message"`` per problem."""

    def __init__(self, errors: list[str] | str, source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" in {self.source}" if self.source else ""
        count = len(self.errors)
        noun = "error" if count == 1 else "errors"
        lines = "\n".join(f"  - {error}" for error in self.errors)
        return f"invalid configuration{where} ({count} {noun}):\n{lines}"

    def __str__(self) -> str:
        return self._message()


def _config_errors(errors: list[tuple[tuple[str | int, ...], str]]) -> PydanticCustomError:
    """One pydantic error carrying several errors at sub-locations of the failing model."""
    return PydanticCustomError(
        _MULTI_ERROR,
        "; ".join(message for _, message in errors),
        {"errors": errors},
    )


# --------------------------------------------------------------------------------------
# models


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _validate_topic(value: str) -> str:
    if not _TOPIC_RE.fullmatch(value):
        raise PydanticCustomError(
            "topic_name",
            "invalid name {value} (1-249 characters: letters, digits, '.', '_', '-')",
            {"value": _shown(value)},
        )
    return value


def _validate_http_url(value: str, *, trailing_slash: bool) -> str:
    value = value.strip()
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise PydanticCustomError(
            "http_url",
            "invalid URL {value} (expected http://... or https://...)",
            {"value": _shown(value)},
        )
    if trailing_slash and not value.endswith("/"):
        value += "/"
    return value


class KafkaSettings(_Section):
    """``kafka:`` section. ``bootstrap_servers`` None means: use the embedded broker."""

    bootstrap_servers: str | None = None
    ingest_topic: str = "segment.events"
    dead_letter_topic: str = "segment.events.dlq"
    partitions: int = Field(default=8, ge=1)
    topic_prefix: str = "emarsys-stream"
    replication_factor: int = Field(default=1, ge=1)
    app_id: str = "emarsys-stream"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        servers = [part.strip() for part in value.split(",")]
        if any(not part for part in servers):
            raise PydanticCustomError(
                "servers",
                "empty entry in comma-separated list {value}",
                {"value": _shown(value)},
            )
        return ",".join(servers)

    @field_validator("ingest_topic", "dead_letter_topic", "topic_prefix", "app_id")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        return _validate_topic(value)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        protocol = self.security_protocol
        uses_sasl = protocol.startswith("SASL_")
        uses_ssl = protocol in ("SSL", "SASL_SSL")
        sasl_values = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
        }
        for key, value in sasl_values.items():
            if uses_sasl and value is None:
                errors.append(((key,), f"required when security_protocol is {protocol}"))
            elif not uses_sasl and value is not None:
                errors.append(
                    (
                        (key,),
                        "only allowed when security_protocol is SASL_PLAINTEXT or SASL_SSL "
                        f"(it is {protocol})",
                    )
                )
        ssl_files = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        for key, path in ssl_files.items():
            if path is None:
                continue
            if not uses_ssl:
                errors.append(
                    ((key,), f"only allowed when security_protocol is SSL or SASL_SSL "
                     f"(it is {protocol})")
                )
            elif not Path(path).is_file():
                errors.append(((key,), f"file not found: {path}"))
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            errors.append((("ssl_keyfile",), "requires kafka.ssl_certfile"))
        if errors:
            raise _config_errors(errors)
        return self


class WsseAuth(_Section):
    """``emarsys.auth`` with ``type: wsse`` (X-WSSE header, API v2)."""

    type: Literal["wsse"]
    username: str = Field(min_length=1)
    secret: SecretStr = Field(min_length=1)


class OAuth2Auth(_Section):
    """``emarsys.auth`` with ``type: oauth2`` (client credentials, API v3)."""

    type: Literal["oauth2"]
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = Field(min_length=1)
    token_url: str = DEFAULT_TOKEN_URL

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, value: str) -> str:
        return _validate_http_url(value, trailing_slash=False)


AuthSettings = Annotated[WsseAuth | OAuth2Auth, Field(discriminator="type")]


class EmarsysSettings(_Section):
    """``emarsys:`` section. ``api_url`` always ends with ``/``; with oauth2 auth and no
    explicit ``api_url`` it defaults to the v3 base."""

    api_url: str = DEFAULT_API_URL
    auth: AuthSettings
    requests_per_minute: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=1000, ge=1, le=1000)
    flush_interval: Annotated[Duration, Field(gt=0)] = 1.0
    request_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    max_retry_backoff: Duration = 60.0

    @field_validator("api_url")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        return _validate_http_url(value, trailing_slash=True)

    @model_validator(mode="after")
    def _default_api_url(self) -> EmarsysSettings:
        if "api_url" not in self.model_fields_set and isinstance(self.auth, OAuth2Auth):
            self.api_url = DEFAULT_OAUTH2_API_URL
        return self


class PrimaryKeySettings(_Section):
    """``identity.primary_key``: where to find the contact key and which Emarsys field it is."""

    paths: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    field_id: int = Field(default=3, gt=0)
    normalize: list[Normalization] = Field(default_factory=lambda: list(_DEFAULT_NORMALIZE))


class IdentitySettings(_Section):
    """``identity:`` section."""

    primary_key: PrimaryKeySettings
    max_ids_per_user: int = Field(default=50, ge=1)
    hold_max_per_id: int = Field(default=1000, ge=1)
    hold_expiry: Duration = 7 * 86400.0
    # The ingest stage resolves an event by userId (else anonymousId) from this worker's
    # own identity tables where it can tell for sure, sending it straight to
    # contact-events instead of through the identity topic (see agents.ingest).
    resolve_at_ingest: bool = True


class DedupeSettings(_Section):
    """``dedupe:`` section."""

    window: Duration = 86400.0
    #: messageIds remembered per contact within the window (oldest forgotten first).
    max_ids_per_contact: int = Field(default=1000, ge=1)


def _str_or_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise PydanticCustomError(
        "str_or_list",
        "expected a string or a list of strings, got {type}",
        {"type": _type_name(value)},
    )


class DataMapping(_Section):
    """One ``data_map`` entry: the first non-missing path in ``from`` -> Emarsys ``field_id``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        BeforeValidator(_str_or_list),
        Field(alias="from", min_length=1),
    ]
    field_id: int = Field(gt=0)
    transform: Transform | None = None
    allow_empty: bool = False


#: A value written to an audience's contact field (YAML scalars keep their type).
FieldValue = bool | int | float | str


class AudienceMapping(_Section):
    """One ``audiences`` entry: an Engage audience -> an Emarsys contact list and/or field.

    ``key`` is the audience key (snake_cased here, as Engage does) or ``"*"`` for every
    audience without an entry of its own. The list is ``contact_list_id`` or
    ``contact_list_name`` (``{key}`` in the name is replaced by the audience key; with
    ``create_missing: true`` a missing list is created). ``field_id`` also writes membership
    to that contact field: ``field_values[true]`` on entry, ``field_values[false]`` on exit.
    """

    key: str = Field(min_length=1)
    contact_list_id: int | None = Field(default=None, gt=0)
    contact_list_name: str | None = Field(default=None, min_length=1)
    create_missing: bool = False
    field_id: int | None = Field(default=None, gt=0)
    field_values: dict[bool, FieldValue] | None = None

    @field_validator("key")
    @classmethod
    def _snake_key(cls, value: str) -> str:
        value = value.strip()
        if value == WILDCARD:
            return value
        key = snake_case(value)
        if not key:
            raise PydanticCustomError(
                "audience_key",
                "invalid audience key {value} (expected the audience key, e.g. "
                "vip_customers, or '*')",
                {"value": _shown(value)},
            )
        return key

    @field_validator("contact_list_name")
    @classmethod
    def _strip_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("empty", "must not be empty", {})
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _check_targets(self) -> AudienceMapping:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        has_id = self.contact_list_id is not None
        has_name = self.contact_list_name is not None
        if has_id and has_name:
            errors.append(
                (("contact_list_name",), "give contact_list_id or contact_list_name, not both")
            )
        if not has_id and not has_name and self.field_id is None:
            errors.append(
                (("contact_list_id",),
                 "missing required key (an audience needs contact_list_id, contact_list_name "
                 "or field_id)")
            )
        if self.create_missing and not has_name:
            errors.append((("create_missing",), "only allowed with contact_list_name"))
        if self.field_values is not None:
            if self.field_id is None:
                errors.append((("field_values",), "only allowed with field_id"))
            missing = [name for flag, name in ((True, "true"), (False, "false"))
                       if flag not in self.field_values]
            if missing:
                errors.append(
                    (("field_values",),
                     f"needs a value for both true and false (missing: {', '.join(missing)})")
                )
        if self.key == WILDCARD:
            # One list or field for every audience would lose a member who leaves one
            # audience while still in another: each audience needs its own list.
            if has_id:
                errors.append(
                    (("contact_list_id",),
                     "not allowed with key '*' (every audience would share one list); use "
                     "contact_list_name with {key}, e.g. 'Segment {key}'")
                )
            if has_name and KEY_PLACEHOLDER not in (self.contact_list_name or ""):
                errors.append(
                    (("contact_list_name",),
                     "with key '*' the name must contain {key} (replaced by the audience key)")
                )
            if self.field_id is not None:
                errors.append(
                    (("field_id",), "not allowed with key '*' (every audience would share "
                     "one field)")
                )
        if errors:
            raise _config_errors(errors)
        return self


class WebSettings(_Section):
    """``web:`` section (health and metrics endpoint)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=6066, ge=0, le=65535)


class WorkerSettings(_Section):
    """``worker:`` section: Faust/aiokafka tuning; the defaults suit most deployments."""

    batch_max: int = Field(default=2000, ge=1)
    batch_within: Annotated[Duration, Field(gt=0)] = 0.05
    output_batch_max: int = Field(default=5000, ge=1)
    session_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    heartbeat_interval: Annotated[Duration, Field(gt=0)] = 3.0
    commit_interval: Annotated[Duration, Field(gt=0)] = 2.8
    max_poll_records: int = Field(default=10000, ge=1)
    stream_buffer_maxsize: int = Field(default=65536, ge=1)
    # Messages each agent may hold unread from identity / contact-events. Those carry
    # envelopes of up to 1,000 records (256 KiB), so this bounds the memory a backlog or
    # a replay can take (64 x 256 KiB per agent), which stream_buffer_maxsize would not.
    envelope_buffer_maxsize: int = Field(default=64, ge=1)
    # Envelopes per identity partition the ingest stage may be ahead of the identity
    # agent (see agents.ingest.IngestConsumer._wait_for_identity_agent).
    ingest_max_lead: int = Field(default=1, ge=0)
    # CPython's cyclic GC thresholds for the worker (gc.set_threshold); null keeps
    # CPython's (700, 10, 10). See app.cli.tune_gc. A first threshold of 200,000 lets the
    # short-lived dicts of a batch (thousands of records) die before a collection looks
    # at them: 1.36 s -> 0.08 s of GC in the benchmark with rules, same peak RSS.
    gc_thresholds: tuple[
        Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
    ] | None = (200_000, 50, 100)
    producer_linger_ms: int = Field(default=5, ge=0)
    # Bytes per produce record batch. The embedded (Tansu) broker reports a partition's
    # end offset as "base offset of its last batch + 1", which breaks Faust's changelog
    # recovery; `run` and the tests therefore use 1 (one record per batch) there.
    # Apache Kafka reports end offsets correctly: keep the default.
    producer_max_batch_size: int = Field(default=16384, ge=1)
    standby_replicas: int = Field(default=0, ge=0)
    # How long a fetch may wait for data (aiokafka fetch_max_wait_ms). None keeps Faust's
    # fixed 1500 ms. Apache Kafka answers a fetch as soon as a record is there, so this
    # only bounds idle polling; the embedded (Tansu) broker holds fetches for a large part
    # of the wait even when records arrive, adding up to the wait to each of the three
    # consumer hops: `run` uses 50 there.
    fetch_max_wait_ms: int | None = Field(default=None, ge=1, le=60_000)
    # A Kafka request unanswered this long is logged (API, broker, queue depth).
    kafka_stall_warning: Annotated[Duration, Field(gt=0)] = 20.0
    # RocksDB memory of each table store (one per table and partition this worker holds,
    # six tables): the block cache for reads, and up to `rocksdb_write_buffers` write
    # buffers (memtables) of `rocksdb_write_buffer_mb` for writes. Faust's defaults
    # (2 GiB of cache and 3 x 64 MiB per store) bound nothing in practice; see README
    # "Memory".
    rocksdb_block_cache_mb: int = Field(default=8, ge=1)
    rocksdb_write_buffer_mb: int = Field(default=16, ge=1)
    rocksdb_write_buffers: int = Field(default=2, ge=2)
    # RocksDB's write-ahead log in each table store. Off, as in Kafka Streams: a table's
    # durable copy is its changelog, from which Faust catches a store up on start (see
    # tables.store_options). On only to keep unflushed writes across a SIGKILL locally.
    rocksdb_wal: bool = False


_NULL_MEANS_DEFAULT = (
    "kafka", "dedupe", "web", "data_map", "rules", "rule_engine", "audiences", "worker",
)


class Settings(_Section):
    """The whole configuration file."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    emarsys: EmarsysSettings
    identity: IdentitySettings
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    data_map: list[DataMapping] = Field(default_factory=list)
    web: WebSettings = Field(default_factory=WebSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    store: str = "rocksdb://"
    data_dir: str = Field(default="./data", min_length=1)
    # Extended by later features; permissive for now.
    rules: list[dict[str, Any]] = Field(default_factory=list)
    rule_engine: dict[str, Any] = Field(default_factory=dict)
    audiences: list[AudienceMapping] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        # `kafka:` with every sub-key commented out parses as null: treat it as "all defaults".
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if not (value is None and key in _NULL_MEANS_DEFAULT)
            }
        return data

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if not value.startswith(_STORES):
            raise PydanticCustomError(
                "store",
                "unsupported store {value} (expected 'rocksdb://' or 'memory://')",
                {"value": _shown(value)},
            )
        return value

    @field_validator("data_map")
    @classmethod
    def _unique_field_ids(cls, value: list[DataMapping]) -> list[DataMapping]:
        first: dict[int, int] = {}
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for index, mapping in enumerate(value):
            if mapping.field_id in first:
                errors.append(
                    (
                        (index, "field_id"),
                        f"duplicate field_id {mapping.field_id} "
                        f"(already mapped by data_map[{first[mapping.field_id]}])",
                    )
                )
            else:
                first[mapping.field_id] = index
        if errors:
            raise _config_errors(errors)
        return value

    @model_validator(mode="after")
    def _key_field_not_mapped(self) -> Settings:
        key_field = self.identity.primary_key.field_id
        errors: list[tuple[tuple[str | int, ...], str]] = [
            (
                ("data_map", index, "field_id"),
                f"field {key_field} is the contact key (identity.primary_key.field_id); "
                "it is set from identity.primary_key.paths",
            )
            for index, mapping in enumerate(self.data_map)
            if mapping.field_id == key_field
        ]
        if errors:
            raise _config_errors(errors)
        return self

    @model_validator(mode="after")
    def _check_audiences(self) -> Settings:
        key_field = self.identity.primary_key.field_id
        mapped = {m.field_id: i for i, m in enumerate(self.data_map)}
        keys: dict[str, int] = {}
        fields: dict[int, int] = {}
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for index, audience in enumerate(self.audiences):
            if audience.key in keys:
                errors.append(
                    (("audiences", index, "key"),
                     f"duplicate audience key {audience.key!r} "
                     f"(already mapped by audiences[{keys[audience.key]}])")
                )
            else:
                keys[audience.key] = index
            fid = audience.field_id
            if fid is None:
                continue
            where = ("audiences", index, "field_id")
            if fid == key_field:
                errors.append(
                    (where, f"field {fid} is the contact key (identity.primary_key.field_id)")
                )
            elif fid in mapped:
                errors.append((where, f"field {fid} is also mapped by data_map[{mapped[fid]}]"))
            elif fid in fields:
                errors.append(
                    (where, f"duplicate field_id {fid} (already used by audiences[{fields[fid]}])")
                )
            else:
                fields[fid] = index
        if errors:
            raise _config_errors(errors)
        return self

    def topic(self, name: str) -> str:
        """Full name of an internal topic: ``"<kafka.topic_prefix>.<name>"``."""
        return f"{self.kafka.topic_prefix}.{name}"

    @property
    def ingest_group(self) -> str:
        """Consumer group of the ingest topic (``agents.ingest``; what replay moves)."""
        return f"{self.kafka.app_id}-ingest"


# --------------------------------------------------------------------------------------
# loading


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate the YAML file at ``path``; raises `ConfigError`."""
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"], source) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, not a file"], source) from None
    except PermissionError:
        raise ConfigError([f"{source}: permission denied"], source) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: not a UTF-8 text file"], source) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read ({exc.strerror})"], source) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(source, exc)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: expected a mapping of settings at the top level, "
             f"got {_type_name(data)}"],
            source,
        )
    return settings_from_mapping(data, env, source=source)


def settings_from_mapping(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    source: str | None = None,
) -> Settings:
    """Validate an already parsed configuration mapping (same processing as `load_settings`).

    ``data`` is not modified. ``source`` only names the origin in the `ConfigError` message.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"<root>: expected a mapping of settings, got {_type_name(data)}"], source
        )
    expanded, env_errors = expand_env(copy.deepcopy(dict(data)), environ)
    override = environ.get(BOOTSTRAP_ENV, "").strip()
    if override:
        kafka = expanded.get("kafka")
        if kafka is None:
            expanded["kafka"] = {"bootstrap_servers": override}
        elif isinstance(kafka, dict):
            kafka["bootstrap_servers"] = override
            env_errors = [e for e in env_errors if e[0] != ("kafka", "bootstrap_servers")]

    errors = [f"{_format_loc(loc)}: {message}" for loc, message in env_errors]
    try:
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        unresolved = {loc for loc, _ in env_errors}
        for loc, message in _convert_errors(exc):
            # A value with an unset variable was left unexpanded; its own error says enough.
            if any(loc[: len(bad)] == bad for bad in unresolved):
                continue
            errors.append(f"{_format_loc(loc)}: {message}")
        raise ConfigError(errors, source) from None
    errors.extend(_rule_errors(settings))
    if errors:
        raise ConfigError(errors, source)
    return settings


def _rule_errors(settings: Settings) -> list[str]:
    """Rules are compiled at start-up; a bad rule is a config error naming rule and key."""
    from app.rules import RuleConfigError, parse_rules

    engine = dict(settings.rule_engine)
    errors: list[str] = []
    idle = engine.pop("idle_timeout", None)
    if idle is not None:
        try:
            parse_duration(idle)
        except ValueError as exc:
            errors.append(f"rule_engine.idle_timeout: {exc}")
    try:
        parse_rules(settings.rules, engine)
    except RuleConfigError as exc:
        errors.extend(exc.errors)
    return errors


def redacted_dict(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-compatible data (YAML key names), every secret as ``**********``."""
    return settings.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------------------
# environment expansion

_VAR_RE = re.compile(r"\$\$(?=\{)|\$\{([^}]*)\}|\$\{")
_VAR_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)

Loc = tuple[str | int, ...]


def expand_env(data: Any, env: Mapping[str, str]) -> tuple[Any, list[tuple[Loc, str]]]:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string inside ``data``.

    Returns the expanded copy and a list of ``(location, message)`` errors. A string with an
    error is left unexpanded. ``$${`` stands for a literal ``${``. ``:-default`` applies when
    the variable is unset or empty (as in the shell). Messages never contain values.
    """
    errors: list[tuple[Loc, str]] = []
    return _expand(data, (), env, errors), errors


def _expand(value: Any, loc: Loc, env: Mapping[str, str], errors: list[tuple[Loc, str]]) -> Any:
    if isinstance(value, dict):
        return {key: _expand(item, (*loc, key), env, errors) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, (*loc, index), env, errors) for index, item in enumerate(value)]
    if isinstance(value, str) and "$" in value:
        return _expand_string(value, loc, env, errors)
    return value


def _expand_string(
    value: str, loc: Loc, env: Mapping[str, str], errors: list[tuple[Loc, str]]
) -> str:
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        body = match.group(1)
        if body is None:
            problems.append("unterminated '${' (write '$${' for a literal '${')")
            return text
        parsed = _VAR_BODY_RE.fullmatch(body)
        if parsed is None:
            problems.append(
                "invalid environment variable reference (expected ${NAME} or "
                "${NAME:-default}; write '$${' for a literal '${')"
            )
            return text
        name, default = parsed.group(1), parsed.group(2)
        found = env.get(name)
        if default is not None:
            return found if found else default
        if found is None:
            problems.append(f"environment variable {name} is not set")
            return text
        return found

    result = _VAR_RE.sub(replace, value)
    if problems:
        errors.extend((loc, problem) for problem in dict.fromkeys(problems))
        return value
    return result


# --------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key; the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    # Only the parser's own description and position: the offending line (which could hold
    # a secret) is never quoted.
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        text = f"{problem} ({context})" if context else str(problem)
    else:
        text = exc.__class__.__name__
    return f"{where}: invalid YAML: {text}"


# --------------------------------------------------------------------------------------
# pydantic errors -> "dotted.path: message"

_EXPECTED: dict[str, str] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}

_LITERAL_NOUNS: dict[str, str] = {
    "transform": "transform",
    "security_protocol": "security protocol",
    "sasl_mechanism": "SASL mechanism",
    "normalize": "normalization",
}

_COMPARISONS: dict[str, tuple[str, str]] = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {
        bool: "boolean", int: "integer", float: "number", str: "string",
        list: "list", dict: "mapping",
    }
    return names.get(type(value), type(value).__name__)


def _is_secret(loc: Loc) -> bool:
    return any(
        isinstance(part, str) and any(word in part.lower() for word in _SECRET_WORDS)
        for part in loc
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: Any, secret: bool) -> str:
    if secret or value is None or not isinstance(value, str | int | float | bool):
        return f"got {_type_name(value)}"
    return f"got {_type_name(value)} {_shown(value)}"


def _convert_errors(exc: ValidationError) -> Iterator[tuple[Loc, str]]:
    for error in exc.errors(include_url=False):
        raw_loc: Loc = tuple(error["loc"])
        if error["type"] == _MULTI_ERROR:
            ctx = error.get("ctx") or {}
            for sub_loc, message in ctx.get("errors", []):
                yield _display_loc((*raw_loc, *sub_loc)), message
            continue
        loc = _display_loc(raw_loc)
        message = _message(error, raw_loc, loc)
        if _is_secret(loc):
            # Belt and braces: no echo of a secret's value, whatever the message template.
            value = error.get("input")
            shown = (error.get("ctx") or {}).get("value")
            for text in (shown, value):
                if isinstance(text, str) and len(text) >= 4:
                    message = message.replace(text, "***")
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
            loc = (*loc, "type")
        yield loc, message


def _message(error: Any, raw_loc: Loc, loc: Loc) -> str:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    secret = _is_secret(loc)
    key = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if kind == "extra_forbidden":
        return _unknown_key_message(raw_loc)
    if kind == "missing":
        return "missing required key"
    if kind == "union_tag_not_found":
        return f"missing required key (expected one of: {_auth_tags()})"
    if kind == "union_tag_invalid":
        tag = "" if secret else f" {_shown(ctx.get('tag'))}"
        return f"unknown auth type{tag} (expected one of: {_auth_tags()})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, {_got(value, secret)}"
    if kind == "literal_error":
        noun = _LITERAL_NOUNS.get(key, "value")
        shown = "" if secret else f" {_shown(value)}"
        return f"unknown {noun}{shown} (expected one of {ctx.get('expected')})"
    if kind in _COMPARISONS:
        name, symbol = _COMPARISONS[kind]
        got = "" if secret else f" (got {_shown(value)})"
        return f"must be {symbol} {ctx.get(name)}{got}"
    if kind in ("too_short", "string_too_short"):
        minimum = ctx.get("min_length", 1)
        if minimum == 1:
            return "must not be empty"
        return f"must have at least {minimum} {'items' if kind == 'too_short' else 'characters'}"
    if kind in ("too_long", "string_too_long"):
        maximum = ctx.get("max_length")
        return f"must have at most {maximum} {'items' if kind == 'too_long' else 'characters'}"
    message: str = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


# Walking the model tree, to name known keys and to hide discriminator tags in locations.


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _keys(model: type[BaseModel]) -> dict[str, str]:
    """YAML key -> attribute name."""
    return {(info.alias or name): name for name, info in model.model_fields.items()}


def _union_tag_member(annotation: Any, tag: Any) -> type[BaseModel] | None:
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    for member in get_args(annotation):
        if _is_model(member) and "type" in member.model_fields:
            if tag in get_args(member.model_fields["type"].annotation):
                return member  # type: ignore[no-any-return]
    return None


def _walk(loc: Loc) -> tuple[Any, Loc]:
    """Follow ``loc`` through the Settings model: (annotation reached, display location)."""
    current: Any = Settings
    shown: list[str | int] = []
    for part in loc:
        current = _unwrap(current)
        if current is None:
            shown.append(part)
            continue
        member = _union_tag_member(current, part)
        if member is not None:
            current = member  # a discriminator tag: not part of the YAML path
            continue
        shown.append(part)
        if isinstance(part, int):
            current = get_args(current)[0] if get_origin(current) is list else None
        elif _is_model(current):
            name = _keys(current).get(part)
            current = current.model_fields[name].annotation if name else None
        else:
            current = None
    return _unwrap(current), tuple(shown)


def _display_loc(loc: Loc) -> Loc:
    return _walk(loc)[1]


def _unknown_key_message(raw_loc: Loc) -> str:
    parent, _ = _walk(raw_loc[:-1])
    key = raw_loc[-1] if raw_loc else ""
    if not _is_model(parent):
        return "unknown key"
    known = list(_keys(parent))
    match = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if match:
        return f"unknown key (did you mean '{match[0]}'?)"
    return f"unknown key (allowed keys: {', '.join(known)})"


def _auth_tags() -> str:
    tags = [get_args(model.model_fields["type"].annotation)[0] for model in (WsseAuth, OAuth2Auth)]
    return ", ".join(tags)
