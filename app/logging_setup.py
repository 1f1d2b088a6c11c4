"""Worker logging: one JSON object per line (or plain text), secrets masked.

``JsonFormatter`` writes ``ts``, ``level``, ``logger``, ``msg`` plus every ``extra`` field
of the record (and ``exc`` for exceptions). Both formatters take ``secrets``: each of
those values is replaced by ``***`` anywhere in the formatted line (message, extras,
tracebacks), so a secret that slips into a log call never reaches the output.

The same handler serves our ``emarsys_stream.*`` loggers and Faust/mode/aiokafka: the
worker passes :func:`logging_config` to ``faust.Worker(logging_config=...)``.

A tiny formatter instead of python-json-logger: twenty lines, no new dependency, and the
redaction has to run on the final line anyway.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "logging_config",
    "secrets_of",
]

MASK = "***"

#: LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _clean(values: Iterable[str | None]) -> tuple[str, ...]:
    # Longest first, so a secret containing another is masked whole.
    return tuple(sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True))


def redact(line: str, secrets: Iterable[str]) -> str:
    """``line`` with every secret (longest first) replaced by ``***``."""
    for s in sorted(secrets, key=len, reverse=True):
        if s in line:
            line = line.replace(s, MASK)
    return line


class _Redacting(logging.Formatter):
    def __init__(self, *args: Any, secrets: Iterable[str | None] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.secrets = _clean(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record), self.secrets)

    def _format(self, record: logging.LogRecord) -> str:
        return super().format(record)


class JsonFormatter(_Redacting):
    """One JSON object per line: ts, level, logger, msg, extras (, exc)."""

    def _format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception as exc:  # a bad %-format must not lose the line
            msg = f"{record.msg!r} (format error: {exc})"
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return orjson.dumps(out, default=repr).decode()


class TextFormatter(_Redacting):
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s", secrets=secrets
        )


def secrets_of(settings: Settings) -> list[str]:
    """Every configured secret value (Emarsys WSSE secret, OAuth client secret, SASL)."""
    out: list[str] = []
    auth = settings.emarsys.auth
    for name in ("secret", "client_secret"):
        value = getattr(auth, name, None)
        if value is not None:
            out.append(value.get_secret_value())
    if settings.kafka.sasl_password:
        out.append(settings.kafka.sasl_password.get_secret_value())
    return [s for s in out if s]


def logging_config(
    fmt: str = "json", loglevel: str | int = "info", secrets: Iterable[str | None] = ()
) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: one stdout handler, our formatter."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    level = logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else loglevel
    factory = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": f"{factory.__module__}.{factory.__name__}",
                        "secrets": list(_clean(secrets))},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            # aiokafka/kafka are chatty at INFO (every fetch session, coordinator hop).
            "aiokafka": {"level": max(level, logging.WARNING) if isinstance(level, int)
                         else "WARNING"},
        },
        "root": {"level": level, "handlers": ["default"]},
    }


def configure_logging(
    fmt: str = "json", loglevel: str | int = "info", secrets: Iterable[str | None] = ()
) -> dict[str, Any]:
    """Apply :func:`logging_config` now (before the Faust worker takes over); returns it."""
    config = logging_config(fmt, loglevel, secrets)
    logging.config.dictConfig(config)
    return config
