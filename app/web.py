"""HTTP views on the worker's web port: /metrics, /health, /users/{primary_key}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tables.codec import loads

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register_views"]


def health_state(rt: Runtime) -> dict[str, Any]:
    app = rt.app
    try:
        assigned = len(app.consumer.assignment())
    except Exception:
        assigned = 0
    recovery = getattr(app.tables, "recovery", None)
    recovered = bool(recovery is not None and recovery.completed.is_set())
    ready = assigned > 0 and recovered and not app.rebalancing
    return {
        "ready": ready,
        "assigned_partitions": assigned,
        "tables_recovered": recovered,
        "rebalancing": bool(app.rebalancing),
    }


def register_views(rt: Runtime) -> None:
    app = rt.app

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        try:
            rt.metrics.users_table_keys.set(sum(1 for _ in rt.tables.users.keys()))
        except Exception:  # table not ready during a rebalance
            pass
        return web.bytes(rt.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        state = health_state(rt)
        return web.json(state, status=200 if state["ready"] else 503)

    @app.page("/users/{primary_key}")
    @app.table_route(table=rt.tables.users, match_info="primary_key")
    async def user(web: Any, request: Any, primary_key: str) -> Any:
        raw = rt.tables.users.get(primary_key.encode())
        if raw is None:
            return web.json({"error": "unknown primary key"}, status=404)
        return web.json(loads(raw))
