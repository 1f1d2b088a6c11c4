"""A worker whose Kafka consumers use another ``fetch_max_wait_ms`` (diagnostic only).

``python -m bench.fetch_wait_worker MS worker --config FILE`` runs ``emarsys-stream worker``
with every ``AIOKafkaConsumer`` that is given a ``fetch_max_wait_ms`` (Faust passes a fixed
1500) getting ``MS`` instead. Used by ``python -m bench latency --fetch-max-wait-ms MS`` to
show how much of the latency is the embedded broker holding each fetch: Tansu answers a
fetch only after a good part of that wait even when records arrived meanwhile, while
Apache Kafka answers as soon as ``fetch_min_bytes`` (1) are there. This is not the shipped
worker; nothing in ``app/`` changes.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m bench.fetch_wait_worker MS worker --config FILE")
    wait_ms = int(argv[0])
    import aiokafka

    original = aiokafka.AIOKafkaConsumer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if "fetch_max_wait_ms" in kwargs:
            kwargs["fetch_max_wait_ms"] = wait_ms
        original(self, *args, **kwargs)

    aiokafka.AIOKafkaConsumer.__init__ = init  # type: ignore[method-assign]
    from app.cli import main as cli_main

    sys.argv = ["emarsys-stream", *argv[1:]]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
