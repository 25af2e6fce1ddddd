"""Shared benchmark helpers: device facts, paired timing (warm-up, median of repeats), JSON."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "bench_results"


def device_info(device: torch.device) -> dict:
    """What a reader needs to compare two benchmark files."""
    info = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["load_average"] = os.getloadavg()[0]  # the machine may be shared: quote ratios
    except OSError:
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paired(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that load drifts on a shared
    machine hit every contender alike. Each function runs ``warmup`` times untimed first.

    On CUDA the clock is wall time after a synchronize. On CPU it is the process's CPU time
    (``time.process_time``): other users of a shared machine then delay a run without being
    counted in it; run with one intra-op thread so that no thread spins while waiting.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """``min(num) / min(den)``: interference only ever adds time, so the fastest of the
    repeats estimates each contender's own cost (``timeit``'s convention)."""
    return min(times[num]) / min(times[den])


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of the paired ratio ``num_i / den_i`` (a second opinion)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from robustkit.utils import atomic_write_json

        atomic_write_json(path, obj)
    except ImportError:  # pragma: no cover - running outside the package
        path.write_text(json.dumps(obj, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    """``rows``: dicts with name, value, target (``<= x``, or None), ok and an optional note."""
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'measurement':<{width}} {'ratio':>8}  {'target':>8}  result")
    for r in rows:
        target = "" if r.get("target") is None else f"<= {r['target']:.2f}"
        result = "" if r.get("target") is None else ("PASS" if r["ok"] else "FAIL")
        print(f"{r['name']:<{width}} {r['value']:>8.3f}  {target:>8}  {result:4}  "
              f"{r.get('note', '')}".rstrip())


def summary(t: dict[str, list[float]]) -> dict[str, dict]:
    """min / median / all of each contender's times."""
    return {k: {"min": min(v), "median": median(v), "all": v} for k, v in t.items()}


# ------------------------------------------------------------------ memory
def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_growth(fn: Callable[[], object]) -> int | None:
    """Growth of the resident set during ``fn()`` (Linux): freed heap pages are handed back
    (``malloc_trim``) and the high-water mark reset to the current RSS first. ``None`` where
    /proc or glibc is missing."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    gc.collect()
    trim(0)
    try:
        clear.write_text("5")  # VmHWM := VmRSS
        before = _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None
    fn()
    return _status_bytes("VmHWM") - before


@contextlib.contextmanager
def _native_stderr_to_devnull():
    """File descriptor 2 pointed at /dev/null for the block: the CPU profiler's kineto writes
    ``USDT:... profiler_start`` / ``profiler_stop`` lines straight to it (``KINETO_LOG_LEVEL``
    does not silence them), two per measurement, which buried ``make bench``'s tables."""
    import sys

    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_tensor_peak(fn: Callable[[], object]) -> int:
    """Peak of CPU tensor bytes allocated during ``fn()`` above the level at its start, from the
    profiler's allocator events in start order (each operator's own net allocation at its start;
    frees outside operators as ``[memory]`` events)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _native_stderr_to_devnull():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base
