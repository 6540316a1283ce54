"""How the bench times: the machine's copy bandwidth, then contenders alternating within every
repeat (so that drift in frequency or other load hits all of them alike), reported as medians.

The garbage collector is off while timing, and a contender's result is released after its
clock stops, so neither is counted.
"""
from __future__ import annotations

import gc
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cases import Suite

PER_BLOCK = 50  # calls per timed block of the overhead measurement


@dataclass(frozen=True)
class Repeats:
    """How many timed repeats a case gets: as many as fit in `budget_s` (judged from the
    warm-up), but at least `least` and at most `most`."""
    warmup: int
    budget_s: float
    least: int
    most: int
    copies_dram: int
    copies_cache: int

    def count(self, round_s: float) -> int:
        fit = int(self.budget_s / round_s) if round_s > 0 else self.most
        return max(self.least, min(self.most, fit))


FULL = Repeats(warmup=2, budget_s=3.0, least=15, most=200, copies_dram=15, copies_cache=100)
QUICK = Repeats(warmup=1, budget_s=0.4, least=5, most=30, copies_dram=5, copies_cache=25)


# ----------------------------------------------------------------------------- copy bandwidth

def _copy_rate(nbytes: int, threads: int, repeats: int, inner: int):
    """Bytes read + written per second by np.copyto of a float32 array of `nbytes`, split
    into `threads` slices copied in parallel (NumPy releases the GIL while copying); each
    timed sample is `inner` back-to-back copies. Returns (median GB/s, samples GB/s)."""
    n = max(1, nbytes // 4)
    src = np.arange(n, dtype=np.float32)
    dst = np.empty_like(src)
    srcs, dsts = np.array_split(src, threads), np.array_split(dst, threads)

    def copy(d, s):
        for _ in range(inner):
            np.copyto(d, s)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        def once():
            if threads == 1:
                copy(dst, src)
            else:
                list(pool.map(copy, dsts, srcs))

        once()  # first touch of the destination's pages
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            rates.append(2 * src.nbytes * inner / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), rates


def measure_bandwidth(suite: Suite, threads: int, reps: Repeats) -> dict:
    """Copy bandwidth out of DRAM and in cache, at `threads` threads and (if that is more) at 1."""
    out = {"threads": threads, "unit": "GB/s (1e9 bytes read + written per second)"}
    for t in sorted({threads, 1}, reverse=True):
        key = "" if t == threads else "_1_thread"
        dram, dram_s = _copy_rate(suite.dram_bytes, t, reps.copies_dram, 1)
        cache, cache_s = _copy_rate(suite.cache_bytes, t, reps.copies_cache // 5 or 1, 5)
        out["dram" + key] = {"array_bytes": suite.dram_bytes, "gbps": dram, "samples": dram_s}
        out["cache" + key] = {"array_bytes": suite.cache_bytes, "gbps": cache, "samples": cache_s}
    return out


# ----------------------------------------------------------------------------- contenders

class _GcOff:
    """The garbage collector off inside the block (and back as it was)."""

    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


def time_contenders(fns: dict, reps: Repeats):
    """Warm-up rounds, then repeats in which every contender runs once, the order rotated
    each repeat. Returns ({name: seconds of each repeat}, repeats, {name: first result})."""
    names = list(fns)
    first = {}
    round_s = 0.0
    for i in range(max(1, reps.warmup)):
        t_round = time.perf_counter()
        for name in names:
            r = fns[name]()
            if i == 0:
                first[name] = r
            r = None
        round_s = time.perf_counter() - t_round
    repeats = reps.count(round_s)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _GcOff():
        for k in range(repeats):
            j = k % len(names)
            for name in names[j:] + names[:j]:
                fn = fns[name]
                t0 = time.perf_counter()
                r = fn()
                samples[name].append(time.perf_counter() - t0)
                r = None  # the result is freed outside the clock
    return samples, repeats, first


def time_blocks(fns: dict, blocks: int, per_block: int = PER_BLOCK) -> dict:
    """Seconds per call of small calls: one warm-up block each, then `blocks` blocks of
    `per_block` back-to-back calls, the contenders alternating by block. Returns
    {name: median seconds per call}."""
    names = list(fns)
    for name in names:
        for _ in range(per_block):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _GcOff():
        for k in range(blocks):
            j = k % len(names)
            for name in names[j:] + names[:j]:
                fn = fns[name]
                t0 = time.perf_counter()
                for _ in range(per_block):
                    fn()
                samples[name].append((time.perf_counter() - t0) / per_block)
    return {name: statistics.median(s) for name, s in samples.items()}
