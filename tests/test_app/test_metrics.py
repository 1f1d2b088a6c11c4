from __future__ import annotations

import gc

from app.metrics import GcTimer, Metrics


def _gc_seconds(metrics: Metrics, generation: int) -> float:
    value = metrics.registry.get_sample_value(
        "emarsys_stream_gc_seconds_total", {"generation": str(generation)}
    )
    assert value is not None
    return value


def test_gc_timer_counts_each_collection_by_generation_while_installed() -> None:
    metrics = Metrics()
    with GcTimer(metrics):
        gc.collect(0)
        gc.collect(2)
        after_collects = (_gc_seconds(metrics, 0), _gc_seconds(metrics, 2))
    assert after_collects[0] > 0
    assert after_collects[1] > 0
    assert _gc_seconds(metrics, 1) == 0
    # Removed on exit: later collections are not counted.
    gc.collect(2)
    assert _gc_seconds(metrics, 2) == after_collects[1]


def test_gc_timer_installs_once_and_removes_its_own_callback_only() -> None:
    metrics = Metrics()
    before = list(gc.callbacks)
    timer = GcTimer(metrics).install().install()
    assert len(gc.callbacks) == len(before) + 1
    timer.remove()
    timer.remove()
    assert gc.callbacks == before
