"""Helpers for benchmarks: run a callable in a fresh process and report wall time and peak RSS.

Why a subprocess: peak RSS (ru_maxrss) is per process and never goes down, so each
measurement needs its own process to be comparable.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple


def _child(fn: Callable[..., Any], args: Tuple[Any, ...], queue: "mp.Queue[Dict[str, Any]]") -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    extra = fn(*args)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"wall_s": wall, "peak_rss_gb": peak / 2**20, "baseline_rss_gb": base / 2**20, "extra": extra})


def measure(fn: Callable[..., Any], *args: Any) -> Dict[str, Any]:
    """Run ``fn(*args)`` in a forked process; returns wall_s, peak_rss_gb and fn's return value."""
    ctx = mp.get_context("fork")
    queue: "mp.Queue[Dict[str, Any]]" = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def print_table(title: str, header: Sequence[str], rows: List[Sequence[Any]]) -> None:
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
