"""Dead-letter envelopes (pure, no I/O).

Shape (see docs/INTERFACES.md, "Topic payloads")::

    {"reason": str, "error": str,
     "source": {"topic", "partition", "offset", "timestamp"},
     "raw": str, "raw_base64": bool}

``raw`` is the original message value as text when it is valid UTF-8 (``raw_base64`` false),
else standard base64 of the bytes (``raw_base64`` true). :func:`raw_bytes_from_envelope`
recovers the exact original bytes, also after an orjson/JSON round trip of the envelope
(strict UTF-8 decoding never yields lone surrogates, so the text always serialises).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MAX_ERROR_CHARS", "dead_letter_envelope", "raw_bytes_from_envelope"]

#: ``error`` texts longer than this are cut (the raw payload is kept whole).
MAX_ERROR_CHARS: Final = 2000


def dead_letter_envelope(
    reason: str, error: str, raw: bytes, source: Mapping[str, Any]
) -> dict[str, Any]:
    """Build the envelope for one rejected message (``source`` is copied)."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    data = bytes(raw)
    try:
        text = data.decode("utf-8")
        is_base64 = False
    except UnicodeDecodeError:
        text = base64.b64encode(data).decode("ascii")
        is_base64 = True
    return {
        "reason": reason,
        "error": error,
        "source": dict(source),
        "raw": text,
        "raw_base64": is_base64,
    }


def raw_bytes_from_envelope(envelope: Mapping[str, Any]) -> bytes:
    """The exact original bytes of an envelope; ``ValueError`` if it is malformed."""
    raw = envelope.get("raw")
    if not isinstance(raw, str):
        raise ValueError("dead-letter envelope has no string 'raw'")
    flag = envelope.get("raw_base64", False)
    if not isinstance(flag, bool):
        raise ValueError("dead-letter envelope 'raw_base64' must be a boolean")
    if not flag:
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"dead-letter envelope 'raw' is not encodable: {exc}") from exc
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"dead-letter envelope 'raw' is not valid base64: {exc}") from exc
