"""``python -m bench pipeline|latency|state|stages [options]``: see bench/README.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from bench import latency, stages, state
from bench.generate import RULE_CATEGORIES, RULE_TEMPLATES
from bench.pipeline import RESULTS_DIR, BenchError, PipelineOptions, run_pipeline

QUICK_EVENTS, QUICK_CONTACTS = 20_000, 2_000
DEFAULT_EVENTS, DEFAULT_CONTACTS = 200_000, 50_000
#: --compare-rules without --rules
COMPARE_RULES = 20
MAX_RULES = len(RULE_TEMPLATES) * len(RULE_CATEGORIES)


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected dotted.key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pipeline",
        help="end-to-end throughput: ingest topic backlog -> worker -> Emarsys simulator",
        description="Produce N Segment events, then time one worker from ready until the "
        "Emarsys simulator holds every expected contact; compare with a raw aiokafka "
        "consume + orjson.loads of the same topic and with a naive two-hop Faust pipeline "
        "on the same topic.",
    )
    p.add_argument(
        "--events",
        type=int,
        default=None,
        help=f"events to produce (default {DEFAULT_EVENTS:,}; --quick {QUICK_EVENTS:,})",
    )
    p.add_argument(
        "--contacts",
        type=int,
        default=None,
        help=f"people (default {DEFAULT_CONTACTS:,}; --quick {QUICK_CONTACTS:,})",
    )
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (4)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.add_argument(
        "--store",
        choices=("rocksdb://", "memory://"),
        default="rocksdb://",
        help="table store of the worker (rocksdb://)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EVENTS:,} events / {QUICK_CONTACTS:,} contacts (under a minute)",
    )
    p.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    p.add_argument(
        "--flush-interval", type=float, default=1.0, help="emarsys.flush_interval in seconds (1.0)"
    )
    p.add_argument("--batch-size", type=int, default=1000, help="emarsys.batch_size (1000)")
    p.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a worker config key, e.g. --set worker.batch_max=5000 "
        "(repeatable; the value is YAML)",
    )
    p.add_argument(
        "--rules",
        type=int,
        default=0,
        metavar="N",
        help=f"rules profile: shop events and N rules (0..{MAX_RULES}; 3-4 steps each, "
        "absences, where, eq_step) in the worker config with rule_engine "
        "{allowed_lateness: 5m, idle_timeout: 5s}; reports rule matches, triggers and rule "
        "state bytes per contact (0: no rules, the plain events)",
    )
    p.add_argument(
        "--compare-rules",
        action="store_true",
        help="run the same input twice, one worker after the other (own app id and topic "
        f"prefix each): without rules, then with --rules N (N={COMPARE_RULES} if not given)",
    )
    p.add_argument(
        "--no-naive",
        dest="naive",
        action="store_false",
        help="skip the naive two-hop Faust reference (bench.naive_faust: ingest -> re-key by "
        "email with await topic.send() per event -> table write per event, tuned settings, "
        "own consumer group), which otherwise runs on the same ingest topic before the worker",
    )
    p.add_argument(
        "--compare-workers",
        action="store_true",
        help="run the same input twice, one after the other (own app id, topics and state "
        "each): 1 worker, then --workers workers (2 if not given); prints both rates and "
        "their ratio",
    )
    p.add_argument(
        "--rules-settle",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with rules: keep the worker running this long after the measurement before "
        "counting matches and triggers (5)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="give up this many seconds after the worker is ready (1800)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="give up (with a py-spy stack dump if installed) after this many "
        "seconds without progress (120)",
    )
    p.add_argument(
        "--baseline-runs", type=int, default=2, help="raw consume runs; the best counts (2)"
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="record worker 0 with py-spy (must be installed) from ready to the end into "
        "FILE: .svg flamegraph, .txt collapsed stacks, .json speedscope",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work dir (logs, configs, table data) after a good run",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <timestamp>.json (bench/results)",
    )
    latency.add_parser(sub, _override)
    state.add_parser(sub, _override)
    stages.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    other = {"latency": latency.main, "state": state.main, "stages": stages.main}.get(
        args.command
    )
    if other is not None:
        try:
            return other(args)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    if args.command != "pipeline":  # pragma: no cover - argparse enforces the choices
        return 2
    events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    contacts = args.contacts or (QUICK_CONTACTS if args.quick else DEFAULT_CONTACTS)
    rules = args.rules or (COMPARE_RULES if args.compare_rules else 0)
    if not 0 <= rules <= MAX_RULES:
        print(f"bench: --rules must be 0..{MAX_RULES}", file=sys.stderr)
        return 2
    if args.compare_rules and args.compare_workers:
        print("bench: --compare-rules and --compare-workers do not combine", file=sys.stderr)
        return 2
    opts = PipelineOptions(
        events=events,
        contacts=contacts,
        partitions=args.partitions,
        workers=args.workers,
        store=args.store,
        seed=args.seed,
        flush_interval=args.flush_interval,
        batch_size=args.batch_size,
        overrides=dict(args.overrides),
        timeout=args.timeout,
        stall_timeout=args.stall_timeout,
        baseline_runs=args.baseline_runs,
        keep=args.keep,
        profile=args.profile,
        quick=args.quick,
        results_dir=args.results_dir,
        rules=rules,
        compare_rules=args.compare_rules,
        rules_settle=args.rules_settle,
        naive=args.naive,
        compare_workers=args.compare_workers,
    )
    try:
        return run_pipeline(opts)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
