"""``python -m bench stages``: the worker's own per-event work, stage by stage, without Kafka.

The pipeline benchmark measures everything a worker does, Kafka and Faust included, on
a shared 2-core machine where identical runs differ by 10-15%: a change worth 2% of the
worker's CPU cannot be seen there. This benchmark runs the pure code of every stage in
one process over the pipeline benchmark's input (same generator, same worker config
and rules) and reports CPU microseconds per input event for each stage, best of
``--repeat`` runs:

- **ingest**: :func:`app.events.validate_event`, :func:`app.data_map.resolve_primary_key`,
  :func:`app.resolution.route_ingested` (with resolution at ingest against the identity
  tables as the previous batches left them, as on one worker), an event left as received
  passed on as its raw bytes (:func:`app.resolution.send_event_as_received`) and
  :func:`app.envelope.pack` of the ``identity`` and ``contact-events`` envelopes;
- **identity**: :func:`app.envelope.unpack`, :class:`app.resolution.IdentityResolver`
  (look-ups, holding, releasing), the envelopes it forwards;
- **users**: unpack, :class:`app.contacts.ContactUpdater` (as ``agents.users`` builds it),
  the users records read and written, the operations encoded;
- **rules** (with ``--rules``): :class:`app.rules.RuleEngine` over the records the users
  stage decoded (as in the worker, :mod:`app.shared_decode`) with the rules
  agent's skip of irrelevant events, the rule state read and written.

Tables are dicts of orjson bytes read through a per-batch view that decodes a key once
and encodes each changed key once per batch, as ``tables.view.TableView`` does; what
is left out is what the pipeline benchmark adds on top: Kafka (fetch, produce,
changelog records), Faust's streams, RocksDB, asyncio, the output agent's HTTP calls,
and the clock of the rules agent (here the watermark is the newest event time of the
previous batches minus ``allowed_lateness``).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agents.rules import engine_settings
from agents.users import contact_updater
from app.data_map import resolve_primary_key
from app.envelope import pack, unpack
from app.events import InvalidEvent, validate_event
from app.identity import UserRecord
from app.resolution import (
    Emit,
    IdentityResolver,
    IdentityState,
    route_ingested,
    send_event_as_received,
)
from app.rules import RuleEngine, parse_rules
from app.settings import Settings, settings_from_mapping
from bench.generate import GeneratedEvents, build_rules, generate_events, rule_time_unit
from tables.view import DELETED, CoalescingView

__all__ = [
    "STAGES",
    "StageRun",
    "add_parser",
    "check_contacts",
    "main",
    "report",
    "run_stages",
    "stage_settings",
]

STAGES = ("ingest", "identity", "users", "rules")
QUICK_EVENTS, QUICK_CONTACTS = 20_000, 2_000
DEFAULT_EVENTS, DEFAULT_CONTACTS = 200_000, 50_000
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_SOURCE = {"topic": "bench.events", "partition": 0, "offset": 0, "timestamp": None}


class _BatchView(CoalescingView):
    """A table of orjson bytes in a dict, seen through one batch the way the agents see a
    Faust table (``tables.view``): each key decoded once, each changed key encoded once
    at :meth:`flush`, minus RocksDB and the changelog."""

    def __init__(self, store: dict[str, bytes]) -> None:
        super().__init__()
        self.store = store

    def _read(self, key: str) -> bytes | None:
        return self.store.get(key)

    def flush(self) -> None:
        for key, value in self.changes():
            if value is DELETED:
                self.store.pop(key, None)
            else:
                self.store[key] = orjson.dumps(value)


@dataclass
class StageRun:
    """One run over the input: CPU seconds per stage and what the stages did."""

    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    counts: dict[str, int] = field(default_factory=dict)
    users: dict[str, bytes] = field(default_factory=dict)
    """The users table at the end (primary key -> orjson record)."""

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


def stage_settings(rules: list[dict[str, Any]]) -> Settings:
    """The pipeline benchmark's worker config (identity, data map, rules) as settings."""
    from bench.pipeline import SECRET_ENV, PipelineOptions, worker_config

    opts = PipelineOptions()
    cfg = worker_config(
        opts, "127.0.0.1:9092", "http://127.0.0.1:1/", 8080, Path("/nonexistent"),
        rules=rules or None,
    )
    return settings_from_mapping(cfg, {SECRET_ENV: "not-used"})


def run_stages(raw_events: list[bytes], settings: Settings) -> StageRun:
    """Every stage over ``raw_events`` in batches of ``worker.batch_max``; CPU per stage."""
    s = settings
    run = StageRun()
    clock = time.process_time
    n_parts = s.kafka.partitions
    batch_max = s.worker.batch_max
    pk_paths, pk_steps = s.identity.primary_key.paths, s.identity.primary_key.normalize
    updater = contact_updater(s)
    engine = RuleEngine(parse_rules(s.rules, engine_settings(s.rule_engine))) if s.rules else None
    lateness = engine.ruleset.allowed_lateness_ms if engine is not None else 0
    identity_tables: dict[str, dict[str, bytes]] = {
        name: {} for name in ("anonymous_ids", "user_ids", "held", "held_items")
    }
    users = run.users
    rule_state: dict[str, bytes] = {}
    links: dict[tuple[str, str], str] = {}
    newest_ts: int | None = None

    def lookup(id_type: str, ident: str) -> str | None:
        raw = identity_tables["user_ids" if id_type == "user" else "anonymous_ids"].get(ident)
        return None if raw is None else str(orjson.loads(raw))

    def envelopes(emits: list[Emit], target: str) -> list[bytes]:
        records = [(e.key, e.value) for e in emits if e.target == target]
        return [env.value for env in pack(records, n_parts)]

    for start in range(0, len(raw_events), batch_max):
        # ingest ------------------------------------------------------------------
        t0 = clock()
        emits: list[Emit] = []
        for raw in raw_events[start : start + batch_max]:
            ev = validate_event(raw)
            if isinstance(ev, InvalidEvent):
                run.count("invalid")
                continue
            pk = resolve_primary_key(ev.event, pk_paths, pk_steps)
            routed = route_ingested(
                ev.event, ev.type, ev.ts_ms, ev.user_id, ev.anonymous_id, pk, dict(_SOURCE),
                known_links=links, lookup=lookup,
            )
            if ev.as_received:
                send_event_as_received(routed, ev.event, raw)
            emits.extend(routed)
        to_identity = envelopes(emits, "identity")
        to_contacts = envelopes(emits, "contact_events")
        t1 = clock()
        run.cpu_s["ingest"] += t1 - t0
        # identity (forwards to itself, e.g. an alias's second stage, go round again) --
        views = {name: _BatchView(table) for name, table in identity_tables.items()}
        state = IdentityState(views["anonymous_ids"], views["user_ids"], views["held"],
                              views["held_items"])
        resolver = IdentityResolver(
            state,
            hold_max_per_id=s.identity.hold_max_per_id,
            hold_expiry_ms=int(s.identity.hold_expiry * 1000),
            now_ms=lambda: int(time.time() * 1000),
        )
        while to_identity:
            out: list[Emit] = []
            for env in to_identity:
                records, _bad = unpack(None, env)
                for key, value in records:
                    out.extend(resolver.handle(key, value))
            to_identity = envelopes(out, "identity")
            to_contacts.extend(envelopes(out, "contact_events"))
        for view in views.values():
            view.flush()
        run.count("held", resolver.stats.held)
        run.count("released", resolver.stats.released)
        t2 = clock()
        run.cpu_s["identity"] += t2 - t1
        # users -------------------------------------------------------------------
        items = [rec for env in to_contacts for rec in unpack(None, env)[0]]
        run.count("contact_events", len(items))
        view = _BatchView(users)

        def load_user(pk: str, view: _BatchView = view) -> UserRecord | None:
            raw = view.get(pk)
            return None if raw is None else UserRecord.from_dict(raw)

        batch = updater.process(items, load_user, int(time.time() * 1000))
        for pk, rec in batch.users.items():
            view[pk] = rec.to_dict()
        ops = updater.finish(batch)
        for op in ops:
            orjson.dumps(op)  # what send_json encodes
        view.flush()
        run.count("operations", len(ops))
        t3 = clock()
        run.cpu_s["users"] += t3 - t2
        if engine is None:
            continue
        # rules (the records the users stage decoded: the worker decodes a
        # contact-events message once for both agents, see app.shared_decode) ------
        wm = None if newest_ts is None else newest_ts - lateness
        view = _BatchView(rule_state)
        for pk, msg in items:
            if msg.get("kind") != "event":
                continue
            ts = int(msg["ts"])
            if msg.get("path") != "held":
                newest_ts = ts if newest_ts is None else max(newest_ts, ts)
            event = msg["event"]
            if not engine.relevant(event):
                run.count("rules_irrelevant")
                continue
            res = engine.on_event(
                view.get(pk), event, ts, str(event.get("messageId")),
                watermark_ms=ts - lateness if wm is None else wm,
            )
            view[pk] = res.state
            run.count("rule_matches", len(res.matches))
            run.count("rules_late", int(res.late))
        view.flush()
        run.cpu_s["rules"] += clock() - t3
    return run


def check_contacts(run: StageRun, gen: GeneratedEvents) -> dict[str, int]:
    """The users table against what the input should give, as the pipeline benchmark
    checks the simulator: every identified person's contact, with the fields of their
    last identify among those queued for Emarsys."""
    stored = {pk: orjson.loads(raw) for pk, raw in run.users.items()}
    wrong = 0
    for pk, fields in gen.expected_fields.items():
        sent = stored.get(pk, {}).get("fields_sent", {})
        if pk in stored and any(sent.get(f) != v for f, v in fields.items()):
            wrong += 1
    return {
        "missing": len(gen.expected_emails - stored.keys()),
        "unexpected": len(stored.keys() - gen.expected_emails),
        "wrong_fields": wrong,
    }


def _best(runs: list[StageRun]) -> dict[str, float]:
    return {stage: min(r.cpu_s[stage] for r in runs) for stage in STAGES}


def report(
    runs: list[StageRun], events: int, meta: dict[str, Any], contacts: dict[str, int]
) -> tuple[str, dict[str, Any]]:
    best = _best(runs)
    per_event = {k: v / events * 1e6 for k, v in best.items()}
    total = sum(per_event.values())
    width = 44
    lines = [
        "emarsys-stream stage benchmark (pure code, one process, no Kafka)",
        "=" * (width + 34),
        f"{'events / people / rules':<{width}}{events:,} / {meta['contacts']:,} / {meta['rules']}",
        f"{'runs (best of each stage counts)':<{width}}{len(runs)}",
        f"{'stage':<{width}}{'CPU us / event':>16}{'CPU s':>10}",
    ]
    for stage in STAGES:
        if stage == "rules" and not meta["rules"]:
            continue
        lines.append(f"  {stage:<{width - 2}}{per_event[stage]:>16.2f}{best[stage]:>10.3f}")
    lines.append(f"  {'all stages':<{width - 2}}{total:>16.2f}{sum(best.values()):>10.3f}")
    spread = [sum(r.cpu_s.values()) / events * 1e6 for r in runs]
    lines.append(f"{'all stages per run, us / event':<{width}}"
                 + ", ".join(f"{x:.2f}" for x in spread))
    lines.append(f"{'what the stages did (last run)':<{width}}"
                 + ", ".join(f"{k} {v:,}" for k, v in sorted(runs[-1].counts.items())))
    lines.append(f"{'contacts missing / unexpected / bad fields':<{width}}"
                 f"{contacts['missing']} / {contacts['unexpected']} / {contacts['wrong_fields']}")
    lines.append(f"{'code':<{width}}{meta['code']}")
    lines.append("=" * (width + 34))
    result = {
        **meta,
        "events": events,
        "runs": [{"cpu_s": r.cpu_s, "counts": r.counts} for r in runs],
        "contacts_check": contacts,
        "best_cpu_s": best,
        "best_us_per_event": per_event,
        "all_stages_us_per_event": total,
    }
    return "\n".join(lines), result


def _code_version() -> str:
    from bench.pipeline import _code_version as code_version

    v = code_version()
    commit = str(v.get("commit", "?"))[:10]
    return f"{commit} (+{len(v.get('uncommitted', []))} uncommitted files)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stages",
        help="CPU per event of each stage's pure code (ingest, identity, users, rules), "
        "in one process without Kafka: shows changes too small for a pipeline run",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--events", type=int, default=None,
                   help=f"events (default {DEFAULT_EVENTS:,}; --quick {QUICK_EVENTS:,})")
    p.add_argument("--contacts", type=int, default=None,
                   help=f"people (default {DEFAULT_CONTACTS:,}; --quick {QUICK_CONTACTS:,})")
    p.add_argument("--rules", type=int, default=20, metavar="N",
                   help="rules (bench.generate.build_rules) and shop events; 0: plain events (20)")
    p.add_argument("--repeat", type=int, default=3, help="runs; the best of each stage counts (3)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_EVENTS:,} events / {QUICK_CONTACTS:,} people (seconds)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where to write stages-<timestamp>.json (bench/results)")


def main(args: argparse.Namespace, *, out: Callable[[str], None] = print) -> int:
    events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    contacts = args.contacts or (QUICK_CONTACTS if args.quick else DEFAULT_CONTACTS)
    if events < 1 or contacts < 1 or args.repeat < 1 or args.rules < 0:
        out("bench: --events, --contacts and --repeat must be >= 1, --rules >= 0")
        return 2
    shop = args.rules > 0
    gen = generate_events(events, contacts, seed=args.seed, shop=shop)
    rules = build_rules(args.rules, rule_time_unit(gen)) if shop else []
    settings = stage_settings(rules)
    runs: list[StageRun] = []
    for i in range(args.repeat):
        # Like the worker: its GC thresholds, a clean heap per run.
        gc.collect()
        gc.set_threshold(*settings.worker.gc_thresholds)
        runs.append(run_stages(gen.events, settings))
        out(f"[bench] run {i + 1}/{args.repeat}: "
            f"{sum(runs[-1].cpu_s.values()) / events * 1e6:.2f} us/event")
    meta = {"contacts": contacts, "rules": args.rules, "seed": args.seed,
            "code": _code_version()}
    contacts_check = check_contacts(runs[-1], gen)
    text, result = report(runs, events, meta, contacts_check)
    out(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"stages-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    out(f"results: {path}")
    if any(contacts_check.values()):
        out("bench: the stages did not give the expected contacts (see above)")
        return 1
    return 0
