from __future__ import annotations

import gc

from app.metrics import GcTimer, Metrics


def _gc_seconds(metrics: Metrics, generation: int) -> float | None:
    return metrics.registry.get_sample_value(
        "emarsys_stream_gc_seconds_total", {"generation": str(generation)}
    )


def test_gc_timer_counts_each_collection_by_generation_while_installed() -> None:
    metrics = Metrics()
    assert _gc_seconds(metrics, 0) is None  # no timer, no metric
    was_enabled = gc.isenabled()
    gc.disable()  # only the two collections below, none set off by allocations
    try:
        with GcTimer(metrics):
            gc.collect(0)
            gc.collect(2)
            gen0, gen1, gen2 = (_gc_seconds(metrics, g) for g in range(3))
            assert b'emarsys_stream_gc_seconds_total{generation="2"}' in metrics.render()
    finally:
        if was_enabled:
            gc.enable()
    assert gen0 is not None and gen0 > 0
    assert gen2 is not None and gen2 > 0
    assert gen1 == 0
    # Removed on exit: the metric is gone and later collections are not counted.
    assert _gc_seconds(metrics, 2) is None


def test_gc_timer_installs_once_and_removes_its_own_callback_only() -> None:
    metrics = Metrics()
    before = list(gc.callbacks)
    timer = GcTimer(metrics).install().install()
    assert len(gc.callbacks) == len(before) + 1
    timer.remove()
    timer.remove()
    assert gc.callbacks == before
    counted = list(timer.seconds)
    gc.collect(2)
    assert timer.seconds == counted  # nothing counted after removal
