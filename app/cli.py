"""`emarsys-stream` command line: run | worker | simulator | broker | send | check-config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from app.broker import EMBEDDED_FETCH_MAX_WAIT_MS, EmbeddedBroker, free_port, wait_for_port
from app.settings import ConfigError, Settings, load_settings

__all__ = ["main", "cli"]

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Segment events on Kafka -> users table, data maps -> Emarsys API.",
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file")]


def _load_or_exit(path: Path | str, env: dict[str, str] | None = None) -> Settings:
    try:
        return load_settings(path, env=env)
    except ConfigError as exc:
        typer.echo(f"invalid config {path}:", err=True)
        for err in exc.errors:
            typer.echo(f"  - {err}", err=True)
        raise typer.Exit(2) from None


@cli.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="YAML config file")]) -> None:
    """Validate a config file and print every error with its key path."""
    settings = _load_or_exit(path)
    typer.echo(
        f"{path}: OK (ingest topic {settings.kafka.ingest_topic!r}, "
        f"{len(settings.data_map)} data map entries)"
    )


def _start_worker(settings: Settings, loglevel: str = "info", log_format: str = "json") -> None:
    """Run a Faust worker in this process until stopped (Ctrl-C / SIGTERM)."""
    import faust

    from app.faust_app import build_runtime
    from app.logging_setup import configure_logging, logging_config, secrets_of
    from app.metrics import GcTimer

    if log_format not in ("json", "text"):
        typer.echo(f"--log-format must be json or text, not {log_format!r}", err=True)
        raise typer.Exit(2)
    secrets = secrets_of(settings)
    configure_logging(log_format, loglevel, secrets)
    log = logging.getLogger("emarsys_stream.worker")
    if not settings.kafka.bootstrap_servers:
        typer.echo("kafka.bootstrap_servers is not set (or use `emarsys-stream run`)", err=True)
        raise typer.Exit(2)
    if settings.web.port == 0:
        web = settings.web.model_copy(update={"port": free_port(settings.web.host)})
        settings = settings.model_copy(update={"web": web})
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    rt = build_runtime(settings)
    from app.topics_admin import ensure_topics

    # A private loop: asyncio.run() would unset the loop Faust's worker is about to use.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(ensure_topics(rt))
    finally:
        loop.close()
    url = f"http://{settings.web.host}:{settings.web.port}"
    log.info(f"web listening on {url}", extra={"web_url": url, "port": settings.web.port})
    worker = faust.Worker(
        rt.app,
        loglevel=loglevel,
        quiet=True,
        # A fresh dict: dictConfig consumes parts of the one it is given.
        logging_config=logging_config(log_format, loglevel, secrets),
    )
    tune_gc(settings.worker.gc_thresholds)
    with GcTimer(rt.metrics):
        worker.execute_from_commandline()


def tune_gc(thresholds: tuple[int, int, int] | None) -> None:
    """Fewer cyclic-GC passes over a large, long-lived heap (``worker.gc_thresholds``).

    The pipeline allocates a dict per record; with CPython's default thresholds
    (700, 10, 10) the collector walks the worker's whole heap often enough to take
    about a third of its CPU in the 200,000-event benchmark. Objects alive after start-up
    (modules, Faust's app) are frozen out of collection; cycles are still collected. The
    time spent is counted in ``emarsys_stream_gc_seconds_total``.
    """
    if thresholds is None:
        return
    import gc

    gc.freeze()
    gc.set_threshold(*thresholds)


LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="json (one object per line) | text")
]


@cli.command()
def worker(
    config: ConfigOpt,
    loglevel: Annotated[str, typer.Option(help="debug|info|warning")] = "info",
    log_format: LogFormatOpt = "json",
) -> None:
    """Run a worker against the configured Kafka cluster and Emarsys account."""
    settings = _load_or_exit(config)
    _start_worker(settings, loglevel, log_format)


@cli.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config")] = None,
    simulator_port: Annotated[int, typer.Option(help="0 = pick a free port")] = 0,
    broker_port: Annotated[int, typer.Option(help="0 = pick a free port")] = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Run everything on this machine: embedded broker (if no bootstrap_servers is
    configured), Emarsys simulator (if no config file is given) and a worker."""
    from app.defaults import DEFAULT_CONFIG_YAML

    procs: list[subprocess.Popen[bytes]] = []
    broker: EmbeddedBroker | None = None
    env = dict(os.environ)
    try:
        if config is None:
            tmp = Path(tempfile.mkdtemp(prefix="emarsys-stream-")) / "config.yaml"
            tmp.write_text(DEFAULT_CONFIG_YAML)
            config_path = tmp
            port = simulator_port or free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "simulator", "--port", str(port)],
                    start_new_session=True,
                )
            )
            if not wait_for_port("127.0.0.1", port, 15):
                typer.echo("the Emarsys simulator did not start", err=True)
                raise typer.Exit(1)
            sim_url = f"http://127.0.0.1:{port}/api/v2/"
            data = yaml.safe_load(DEFAULT_CONFIG_YAML)
            data["emarsys"]["api_url"] = sim_url
            tmp.write_text(yaml.safe_dump(data))
        else:
            config_path = config
            sim_url = None
        settings = _load_or_exit(config_path, env)
        if not settings.kafka.bootstrap_servers:
            broker = EmbeddedBroker(port=broker_port).start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
            settings = _load_or_exit(config_path, env)
            # The embedded broker forgets everything on exit, so local table state from
            # an earlier run would not match its (empty) changelogs: start clean.
            fresh = Path(tempfile.mkdtemp(prefix="emarsys-stream-data-"))
            # The embedded broker also holds a new group's first join for about half the
            # session timeout: a short one makes `run` ready in seconds.
            worker_tuning = settings.worker.model_copy(
                update={"producer_max_batch_size": 1, "session_timeout": 6.0,
                        "heartbeat_interval": 1.0,
                        "fetch_max_wait_ms": settings.worker.fetch_max_wait_ms
                        or EMBEDDED_FETCH_MAX_WAIT_MS}
            )
            settings = settings.model_copy(
                update={"data_dir": str(fresh), "worker": worker_tuning}
            )
        typer.echo("")
        typer.echo("emarsys-stream is starting")
        if broker is not None:
            typer.echo(f"  Kafka (embedded, in-memory only): {broker.bootstrap_servers}")
        else:
            typer.echo(f"  Kafka: {settings.kafka.bootstrap_servers}")
        if sim_url:
            typer.echo(
                f"  Emarsys simulator:  {sim_url}  (calls: {sim_url.split('/api')[0]}/_sim/calls)"
            )
        if settings.web.port == 0:
            web = settings.web.model_copy(update={"port": free_port(settings.web.host)})
            settings = settings.model_copy(update={"web": web})
        typer.echo(f"  Worker web:        http://{settings.web.host}:{settings.web.port}/metrics")
        typer.echo(
            f"  Send events:       emarsys-stream send examples/events.jsonl "
            f"--bootstrap-servers {settings.kafka.bootstrap_servers}"
        )
        typer.echo("  Stop with Ctrl-C.\n")
        _start_worker(settings, log_format=log_format)
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(10)
        if broker is not None:
            broker.stop()


@cli.command()
def simulator(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8085,
    rate_limit: Annotated[int, typer.Option(help="requests per minute per user; 0 = off")] = 1000,
    error_rate: Annotated[float, typer.Option(help="fraction of calls answered 5xx")] = 0.0,
) -> None:
    """Run the Emarsys API simulator (user sim-user / secret sim-secret)."""
    from app.simulator import SimulatorOptions, run_simulator_forever

    run_simulator_forever(
        host, port, SimulatorOptions(rate_limit_per_minute=rate_limit, error_rate=error_rate)
    )


@cli.command()
def broker(port: Annotated[int, typer.Option()] = 9092) -> None:
    """Run the embedded Kafka-protocol broker (memory only) in the foreground."""
    b = EmbeddedBroker(port=port).start()
    typer.echo(
        f"embedded broker listening on {b.bootstrap_servers} (data in memory only); Ctrl-C stops"
    )
    try:
        while b.running:
            import time

            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


@cli.command()
def send(
    file: Annotated[Path, typer.Argument(help="JSON lines file, one Segment event per line")],
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
    bootstrap_servers: Annotated[str | None, typer.Option(help="overrides the config")] = None,
    topic: Annotated[str | None, typer.Option(help="default: kafka.ingest_topic")] = None,
) -> None:
    """Produce a JSON-lines file of Segment events to the ingest topic (with progress)."""
    servers = bootstrap_servers
    target = topic
    if config is not None:
        s = _load_or_exit(config)
        servers = servers or s.kafka.bootstrap_servers
        target = target or s.kafka.ingest_topic
    servers = servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not servers:
        typer.echo("give --bootstrap-servers or a --config with kafka.bootstrap_servers", err=True)
        raise typer.Exit(2)
    if not file.exists():
        typer.echo(f"{file}: no such file", err=True)
        raise typer.Exit(2)
    lines = [ln for ln in file.read_bytes().splitlines() if ln.strip()]
    n = asyncio.run(_send_lines(lines, servers, target or "segment.events"))
    typer.echo(f"sent {n} events to {target or 'segment.events'} on {servers}")


@cli.command()
def replay(
    config: ConfigOpt,
    to: Annotated[
        str,
        typer.Option("--to", help="earliest | latest | OFFSET | ISO-8601 time with zone"),
    ],
    partitions: Annotated[
        str | None, typer.Option(help="comma-separated ingest partitions (default: all)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the plan only")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Re-read the ingest topic: move the workers' committed offsets (all workers stopped)."""
    from app import replay as rp

    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    settings = _load_or_exit(config)
    try:
        target = rp.parse_target(to)
        chosen = rp.parse_partitions(partitions)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    group = settings.ingest_group
    topic = settings.kafka.ingest_topic
    try:
        members = asyncio.run(rp.describe_worker_groups(settings))
        rows = asyncio.run(rp.build_plan(settings, target, chosen))
    except rp.ReplayError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(rp.format_plan(rows, topic=topic, group=group, target=target))
    if members.active:
        refusal = rp.format_members(members, settings.worker.session_timeout)
        if dry_run:
            typer.echo(f"dry run: nothing changed.\n{refusal.replace('refused: ', '', 1)}")
            return
        typer.echo(refusal, err=True)
        raise typer.Exit(1)
    if dry_run:
        typer.echo("dry run: nothing changed.")
        return
    if not any(r.changes for r in rows):
        typer.echo("nothing to change: the group is already there.")
        return
    rereads = sum(r.rereads for r in rows)
    skipped = sum(r.skipped for r in rows)
    question = (
        f"Commit these offsets for group {group!r} ({rereads} events re-read, "
        f"{skipped} skipped)?"
    )
    if not yes and not typer.confirm(question, default=False):
        typer.echo("nothing changed.")
        raise typer.Exit(1)
    try:
        # Checked again: the question may have waited a long time.
        members = asyncio.run(rp.describe_worker_groups(settings))
        if members.active:
            typer.echo(rp.format_members(members, settings.worker.session_timeout), err=True)
            raise typer.Exit(1)
        committed = asyncio.run(rp.commit_plan(settings, rows))
    except rp.ReplayError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    wrong = {r.partition: committed.get(r.partition) for r in rows
             if committed.get(r.partition) != r.target}
    for r in rows:
        typer.echo(f"partition {r.partition}: committed offset {committed.get(r.partition)}")
    if wrong:
        typer.echo(f"the committed offsets read back differ from the plan: {wrong}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"done: group {group!r} will re-read {rereads} events of {topic!r} when the workers "
        "start."
    )


async def _send_lines(lines: list[bytes], servers: str, topic: str) -> int:
    from aiokafka import AIOKafkaProducer
    from tqdm import tqdm

    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=5)
    await producer.start()
    try:
        futures: list[Any] = []
        with tqdm(total=len(lines), unit="ev", desc=f"send -> {topic}") as bar:
            for line in lines:
                futures.append(await producer.send(topic, line))
                if len(futures) >= 1000:
                    await asyncio.gather(*futures)
                    bar.update(len(futures))
                    futures.clear()
            await asyncio.gather(*futures)
            bar.update(len(futures))
    finally:
        await producer.stop()
    return len(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cli()


if __name__ == "__main__":
    main()
