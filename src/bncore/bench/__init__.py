"""`python -m bncore bench`: bncore against PyTorch and plain NumPy, and against the memory system.

Normalization is memory bound: a forward pass reads x and writes y, a backward pass reads x and
dy and writes dx, and the arithmetic in between is cheap. So besides timing bncore, PyTorch (when
installed) and NumPy on each case, the bench measures the machine's copy bandwidth first and
reports each bncore time as GB/s under that minimal byte model and as a percentage of the copy
bandwidth out of DRAM.

The package, one role per module:

    cases.py        the cases (op, pass, shape, dtype, layout), the full and tiny suites, the byte model
    contenders.py   what each contender calls on a case, and the check of every contender's outputs
                    against bncore.reference (the float64 reference the tests use; at float32 it is
                    also the NumPy contender)
    timing.py       copy bandwidth; contenders alternating within each repeat; medians
    report.py       the table, the overhead line, machine information, JSON and the PNG chart
    __init__.py     run(): the bench from start to end; main(): the command line's entry point
"""
from __future__ import annotations

import inspect
import statistics
import sys
import time

import bncore

from . import fused, report
from .cases import EPS, MIB, MOMENTUM, SUITES, Case, Suite, full_suite, tiny_suite
from .fused import FUSED_SHAPE
from .contenders import CONTENDERS, build, errors, overhead_contenders, tolerance
from .timing import FULL, PER_BLOCK, QUICK, Repeats, measure_bandwidth, time_blocks, time_contenders

__all__ = ["CONTENDERS", "FULL", "QUICK", "SUITES", "Case", "Repeats", "Suite", "full_suite", "main", "run",
           "run_case", "tiny_suite"]

NOTES = [
    ("bncore writes y (forward) or dx (backward) into a preallocated out=; PyTorch allocates its outputs "
     "(its functional forward has no out=). bncore_alloc is the same bncore call without out=. A fresh "
     "allocation above glibc's mmap threshold (at most 32 MiB) is page-faulted in on every call, which can "
     "dominate the time of a memory-bound kernel; bncore serves such outputs from its cache of freed buffers "
     "(bncore.pool), and alloc_over_out (alloc ms / out= ms) says what allocating still costs."),
    ("PyTorch backward: torch.ops.aten.native_{batch,layer,group}_norm_backward called directly with "
     "output_mask [True, True, True]: only the backward kernel, no autograd graph or engine. RMS norm has no "
     "CPU backward kernel in PyTorch: its row times torch.autograd.grad over F.rms_norm's recorded graph."),
    ("numpy: bncore.reference's formulas evaluated in float32, single-threaded; its backward takes the "
     "forward's saved statistics; its training forward also updates the running statistics."),
    ("Every contender's outputs are checked against bncore.reference in float64 (max_error_vs_reference: "
     "the largest error relative to the largest expected magnitude, within tolerance)."),
    "Each repeat runs every contender once, the order rotated per repeat; times are medians after warm-up.",
    "Speed-ups are bncore's: the other's time / bncore's time (above 1: bncore is faster).",
    ("bfloat16 and float16 cases keep weight, bias and running statistics in float32; the NumPy contender "
     "runs float32 only ('-')."),
]


def run_case(case: Case, torch, reps: Repeats, dram_gbps: float, llc_bytes=None) -> dict:
    """Times the contenders of one case and checks their outputs; returns the case's JSON-able record."""
    fns, torch_call, tensors = build(case, torch)
    samples, repeats, first = time_contenders(fns, reps)
    error = errors(case, tensors, first)
    first = tensors = None  # the case's memory is released before the next one
    med = {name: statistics.median(v) for name, v in samples.items()}
    ms = {name: (med[name] * 1e3 if name in med else None) for name in CONTENDERS}
    gbps = {name: (case.bytes / med[name] / 1e9 if name in med else None) for name in CONTENDERS}
    tol = tolerance(case)
    return {
        "op": case.op, "pass": case.kind, "name": case.name, "shape": list(case.shape), "dtype": case.dtype,
        "layout": case.layout, "groups": case.groups or None, "bytes": case.bytes, "repeats": repeats,
        "ms": ms, "gbps": gbps,
        "ms_min": {name: (min(samples[name]) * 1e3 if name in samples else None) for name in CONTENDERS},
        "samples_ms": {name: [round(t * 1e3, 6) for t in v] for name, v in samples.items()},
        "pct_of_dram_copy": {n: (100 * g / dram_gbps if g is not None else None) for n, g in gbps.items()},
        "speedup_vs_torch": (ms["torch"] / ms["bncore"]) if ms["torch"] is not None else None,
        # both allocating their output: bncore without out=
        "speedup_vs_torch_allocating": (ms["torch"] / (ms["bncore_alloc"] or ms["bncore"]))
        if ms["torch"] is not None else None,
        "speedup_vs_numpy": (ms["numpy"] / ms["bncore"]) if ms["numpy"] is not None else None,
        # what allocating the output costs over writing into out= (1: nothing)
        "alloc_over_out": (ms["bncore_alloc"] / ms["bncore"]) if ms["bncore_alloc"] is not None else None,
        "torch_call": torch_call,
        "max_error_vs_reference": error,
        "tolerance": tol,
        "agrees": all(v <= tol for v in error.values()),
        # the working set (the bytes counted) fits in the last-level cache: repeats may run from it
        "fits_llc": bool(llc_bytes) and case.bytes <= llc_bytes,
    }


def measure_overhead(suite: Suite, torch, quick: bool) -> dict:
    """One small batch norm call (training, running stats, weight, bias): median per-call time over
    blocks of calls, the contenders alternating by block."""
    fns, kind = overhead_contenders(suite, torch)
    blocks = suite.overhead_blocks[1 if quick else 0]
    us = {name: s * 1e6 for name, s in time_blocks(fns, blocks).items()}
    return {"shape": list(suite.overhead_shape), "input": kind,
            "call": "batch_norm(training=True, running stats, weight, bias)",
            "calls": blocks * PER_BLOCK, "us": {"bncore": us["bncore"], "torch": us.get("torch")}}


def _import_torch(disabled: bool):
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _print_bandwidth(echo, suite: Suite, bw: dict, n: int):
    echo(f"copy bandwidth (np.copyto float32, bytes read + written per second, median; {n} thread(s)):")
    echo(f"  DRAM     {suite.dram_bytes // MIB:>4} MiB array: {bw['dram']['gbps']:7.1f} GB/s")
    echo(f"  in-cache {suite.cache_bytes // MIB:>4} MiB array: {bw['cache']['gbps']:7.1f} GB/s"
         f" ({2 * suite.cache_bytes // MIB} MiB source + destination)")
    if "dram_1_thread" in bw:
        echo(f"  1 thread: DRAM {bw['dram_1_thread']['gbps']:.1f} GB/s, in-cache "
             f"{bw['cache_1_thread']['gbps']:.1f} GB/s")


def run(suite: Suite, threads=None, quick=False, torch=None, echo=print) -> dict:
    """Runs the bench; `echo` receives each line as it is printed. Returns the JSON-able report."""
    reps = QUICK if quick else FULL
    prev_threads = bncore.get_num_threads()
    prev_torch = torch.get_num_threads() if torch is not None else None
    if threads is not None:
        bncore.set_num_threads(threads)
    n = bncore.get_num_threads()
    if torch is not None:
        torch.set_num_threads(n)
    try:
        info = report.machine_info(n, torch)
        echo(f"bncore bench: {info['cpu'] or 'unknown CPU'}, {info['usable_cpus']} CPUs")
        echo(f"{n} thread(s) for bncore" + (" and PyTorch" if torch is not None else "") + "; NumPy single-threaded"
             + (" (quick: fewer repeats)" if quick else ""))
        echo("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        runtimes = info["openmp_runtimes"]
        if len(runtimes) > 1:
            echo(f"! {len(runtimes)} OpenMP runtimes loaded ({', '.join(runtimes)}): their thread pools compete "
                 "for the cores (docs/performance.md, 'One OpenMP runtime')")
        load = info["loadavg_start"]
        if load is not None:
            echo(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
                 + (" (something ran in the last minute: if it still runs, times are noisy)" if load[0] >= 0.5
                    else ""))
        if torch is None:
            echo("PyTorch is not installed: no PyTorch column, no half-type cases, bncore runs on NumPy arrays")
        bw = measure_bandwidth(suite, n, reps)
        _print_bandwidth(echo, suite, bw, n)
        echo("")
        for line in report.EXPLANATION:
            echo(line)
        echo(report.header())
        results = []
        skipped = []
        for case in suite.cases:
            if case.dtype != "float32" and torch is None:
                skipped.append(case.label())
                continue
            r = run_case(case, torch, reps, bw["dram"]["gbps"], info["llc_bytes"])
            results.append(r)
            echo(report.format_row(r))
        if any(r["fits_llc"] for r in results):
            echo(f"* the case's bytes fit in the {info['llc_bytes'] / MIB:.0f} MiB last-level cache: repeats may "
                 "run from it,")
            echo("  above the DRAM copy bandwidth")
        if skipped:
            echo(f"skipped without PyTorch: {len(skipped)} half-type case(s)")
        for r in results:
            for name, error in r["max_error_vs_reference"].items():
                if error > r["tolerance"]:
                    echo(f"! {r['name']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}: {name}'s "
                         f"outputs are {error:.1e} off bncore.reference (tolerance {r['tolerance']:.0e})")
        echo("")
        overhead = measure_overhead(suite, torch, quick)
        for line in report.overhead_lines(overhead):
            echo(line)
        settings = {"threads": n, "quick": quick, "eps": EPS, "momentum": MOMENTUM, "warmup_rounds": reps.warmup,
                    "repeat_budget_s": reps.budget_s, "repeats_min": reps.least, "repeats_max": reps.most,
                    "byte_model": "forward: read x + write y; backward: read x, dy + write dx; "
                                  "parameter vectors ignored",
                    "gb": 1e9}
        return {"machine": info, "settings": settings, "loadavg_end": report.loadavg(), "bandwidth": bw,
                "cases": results, "skipped": skipped, "overhead": overhead, "notes": NOTES}
    finally:
        bncore.set_num_threads(prev_threads)
        if torch is not None:
            torch.set_num_threads(prev_torch)


def main(args) -> int:
    """`python -m bncore bench` for its parsed arguments (quick, threads, json, plot, suite, no_torch)."""
    if args.threads is not None and args.threads < 1:
        print(f"bncore bench: --threads: expected a positive number, got {args.threads}", file=sys.stderr)
        return 2
    torch = _import_torch(getattr(args, "no_torch", False))
    suite_name = getattr(args, "suite", "full")
    suite = SUITES[suite_name]()
    only = getattr(args, "only", None)
    if only:
        words = only.split()
        suite.cases = [c for c in suite.cases if all(w in c.label() for w in words)]
        if not suite.cases:
            print(f"bncore bench: --only: no case of the {suite_name} suite matches {only!r}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    result = run(suite, args.threads, args.quick, torch, echo=lambda s: print(s, flush=True))
    result["settings"]["suite"] = suite_name
    result["settings"]["only"] = only
    if only:
        result["settings"]["wall_s"] = time.perf_counter() - t0
        if args.json:
            print(report.write_json(args.json, result))
        return 0
    # the fused epilogue: BN + ReLU in one pass against BN then a separate ReLU (bench/fused.py)
    fused_shape = FUSED_SHAPE if suite_name == "full" else (4, 8, 6, 6)
    print("", flush=True)
    if "activation" in inspect.signature(bncore.batch_norm).parameters:
        result["fused"] = fused.run(fused_shape, args.quick, torch)
        print(fused.report(result["fused"]), flush=True)
    else:  # an older bncore timed by this bench (tools/bench_compare.py) has no fused epilogue
        result["fused"] = {"error": "this bncore has no fused epilogue (batch_norm(activation=))"}
        print(f"fused epilogue: not measured ({result['fused']['error']})", flush=True)
    if suite_name == "full" and not getattr(args, "no_distributed", False):
        # the distributed case: 2 processes on this machine, synchronized vs local batch norm
        print("", flush=True)
        try:
            from .. import sync_bench  # absent when this bench times an older bncore (tools/bench_compare.py)

            result["distributed"] = sync_bench.run(repeats=5 if args.quick else 10)
            print(sync_bench.report(result["distributed"]), flush=True)
        except (ImportError, RuntimeError, OSError) as exc:  # the table stands without the distributed case
            result["distributed"] = {"error": str(exc)}
            print(f"synchronized batch norm: not measured ({exc})", flush=True)
    result["settings"]["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(report.write_json(args.json, result))
    if args.plot:
        print(report.write_plot(args.plot, result["cases"]))
    print(f"({result['settings']['wall_s']:.0f} s)")
    return 0
