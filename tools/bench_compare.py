#!/usr/bin/env python3
"""Before/after: `python -m bncore bench` of two git revisions, run alternately on one machine.

    tools/bench_compare.py main bench                 # the full suite, 3 rounds: A B A B A B
    tools/bench_compare.py --quick --rounds 2 main HEAD

Each revision is exported with `git archive` (committed files only, nothing of the working tree)
and built with pip into a folder of its own; one virtual environment (numpy, torch, and the build
tools, installed once into the work folder) runs both. Then the bench runs A, B, A, B, ... each
time in a fresh process writing --json, and the tool prints, per row of the bench, bncore's median
time in A and in B and their ratio B/A, flagging rows where bncore (with out= or allocating) is
slower in B by more than --threshold (5%). The exit status is 1 when a row is flagged.

Which bench times both: by default the newer side's (B's) command line, bench package and
bncore.reference, copied over A's build, so the two libraries are measured by the same code:
a change of the bench (repeats, contenders, checks) cannot pass for a change of the library, and
the torch column, the same code on both sides, shows the machine's noise (its B/A should be near
1). The bench uses only bncore's public Python API, which both sides share. --bench own runs each
side's own bench instead (the row keys must then match; rows present on one side only are listed).

Timings are only as quiet as the machine: check the load average each bench prints, and rerun a
flagged row's comparison before believing it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the runtime environment needs: the bench's imports and the build's tools (builds run without
# isolation, so nothing is fetched per build); torch is pinned as in pyproject.toml's test extra
RUNTIME = ["numpy", "torch==2.13.0", "scikit-build-core>=0.10", "cython>=3.0"]
# the files of the newer side that time both sides (a bench module or package, whichever B has)
BENCH_FILES = ["__main__.py", "reference.py", "bench", "bench.py"]
SPEED_CONTENDERS = ("bncore", "bncore_alloc")  # the rows' times that must not get slower


def git(*args) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def log(message: str):
    print(f"[bench_compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def runtime_python(work: Path) -> Path:
    """The work folder's virtual environment (created on first use) that runs both sides."""
    venv = work / "venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        log(f"creating {venv} ({', '.join(RUNTIME)})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *RUNTIME], check=True)
        (venv / ".complete").touch()
    return python


def build(python: Path, work: Path, sha: str) -> Path:
    """bncore at `sha`, exported and installed into a folder of its own (cached by commit)."""
    lib = work / f"lib-{sha[:12]}"
    if (lib / ".complete").exists():
        return lib
    src = work / f"src-{sha[:12]}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(lib, ignore_errors=True)
    src.mkdir(parents=True)
    log(f"exporting {sha[:12]} to {src}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha], check=True,
                             capture_output=True).stdout
    tar_path = work / f"src-{sha[:12]}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(src, filter="data")
        else:  # Python < 3.11.4: the archive is git's own, of this repository
            tar.extractall(src)
    tar_path.unlink()
    log(f"building {sha[:12]} into {lib} (pip install --target)")
    t0 = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--target", str(lib), str(src)], check=True)
    log(f"built {sha[:12]} in {time.perf_counter() - t0:.0f} s")
    (lib / ".complete").touch()
    return lib


def prepare_side(work: Path, name: str, lib: Path, bench_src: Path | None) -> Path:
    """A fresh copy of a build to run from; with `bench_src` (a built bncore package folder), that
    package's command line, bench and reference replace the build's own."""
    side = work / "run" / name
    shutil.rmtree(side, ignore_errors=True)
    shutil.copytree(lib, side, ignore=shutil.ignore_patterns(".complete"))
    if bench_src is not None and bench_src != lib / "bncore":
        pkg = side / "bncore"
        shutil.rmtree(pkg / "__pycache__", ignore_errors=True)  # no bytecode of the replaced files
        for entry in BENCH_FILES:
            target = pkg / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            source = bench_src / entry
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.exists():
                shutil.copy2(source, target)
    return side


def side_env(side: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(side)
    env.pop("PYTHONHOME", None)
    return env


def check_side(python: Path, side: Path) -> str:
    """Where bncore is imported from on this side (it must be the side's folder) and its version."""
    out = subprocess.run([str(python), "-c", "import bncore; print(bncore.__file__); print(bncore.__version__)"],
                         env=side_env(side), check=True, capture_output=True, text=True).stdout.split("\n")
    if not Path(out[0]).resolve().is_relative_to(side.resolve()):
        raise SystemExit(f"bench_compare: bncore imports from {out[0]}, not from {side}: another bncore shadows it")
    return out[1]


def run_bench(python: Path, side: Path, json_path: Path, bench_args: list, log_path: Path):
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        subprocess.run([str(python), "-m", "bncore", "bench", "--json", str(json_path), *bench_args],
                       env=side_env(side), check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the comparison

def row_key(case: dict) -> tuple:
    return case["name"], tuple(case["shape"]), case["dtype"], case["layout"]


def medians(reports: list) -> dict:
    """{row key: {contender: median over the rounds of the round's median ms}} and the overhead's."""
    times: dict[tuple, dict[str, list[float]]] = {}
    for report in reports:
        for case in report["cases"]:
            per = times.setdefault(row_key(case), {})
            for name, ms in case["ms"].items():
                if ms is not None:
                    per.setdefault(name, []).append(ms)
        for name, us in report["overhead"]["us"].items():
            if us is not None:
                times.setdefault(("overhead",), {}).setdefault(name, []).append(us)
    return {key: {name: statistics.median(v) for name, v in per.items()} for key, per in times.items()}


def compare(a_reports: list, b_reports: list, threshold: float) -> dict:
    a, b = medians(a_reports), medians(b_reports)
    order = [row_key(c) for c in b_reports[0]["cases"]]
    rows = []
    for key in order:
        if key not in a:
            continue
        ratio = {name: b[key][name] / a[key][name] for name in b[key] if name in a[key]}
        slower = [name for name in SPEED_CONTENDERS if ratio.get(name, 0) > 1 + threshold]
        rows.append({"key": list(key), "a_ms": a[key], "b_ms": b[key], "b_over_a": ratio, "slower": slower})
    overhead = {"a_us": a.get(("overhead",), {}), "b_us": b.get(("overhead",), {})}
    return {"rows": rows, "overhead": overhead, "threshold": threshold,
            "only_in_a": [list(k) for k in a if k not in b and k != ("overhead",)],
            "only_in_b": [list(k) for k in order if k not in a]}


def _ms(v):
    return "-" if v is None else f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}"


def _ratio(v):
    return "-" if v is None else f"{v:.3f}"


def print_table(result: dict, a_name: str, b_name: str):
    head = (f"{'op':<20} {'shape':<13} {'dtype':<8} {'layout':<6} {'A ms':>7} {'B ms':>7} {'B/A':>6} "
            f"{'alloc':>6} {'torch':>6}")
    print(f"A = {a_name}, B = {b_name}. bncore's median ms (forward into out=); B/A of bncore, of bncore")
    print("allocating ('alloc') and of PyTorch ('torch': the same code on both sides, so its B/A shows the")
    print(f"noise). SLOWER: bncore or alloc slower in B by more than {100 * result['threshold']:.0f}%.")
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        name, shape, dtype, layout = row["key"]
        r = row["b_over_a"]
        line = (f"{name:<20} {'x'.join(map(str, shape)):<13} {dtype:<8} {layout:<6} "
                f"{_ms(row['a_ms'].get('bncore')):>7} {_ms(row['b_ms'].get('bncore')):>7} "
                f"{_ratio(r.get('bncore')):>6} {_ratio(r.get('bncore_alloc')):>6} {_ratio(r.get('torch')):>6}")
        print(line + ("  SLOWER" if row["slower"] else ""))
    a_us, b_us = result["overhead"]["a_us"], result["overhead"]["b_us"]
    if "bncore" in a_us and "bncore" in b_us:
        print(f"Python overhead of a small batch_norm: A {a_us['bncore']:.1f} us, B {b_us['bncore']:.1f} us, "
              f"B/A {b_us['bncore'] / a_us['bncore']:.3f}")
    for side, keys in (("A", result["only_in_a"]), ("B", result["only_in_b"])):
        for key in keys:
            print(f"only in {side}: {key[0]} {'x'.join(map(str, key[1]))} {key[2]} {key[3]}")
    torch_ratios = sorted(row["b_over_a"]["torch"] for row in result["rows"] if "torch" in row["b_over_a"])
    if torch_ratios:
        print(f"noise: torch's B/A over the rows: median {statistics.median(torch_ratios):.3f}, "
              f"from {torch_ratios[0]:.3f} to {torch_ratios[-1]:.3f}")
    flagged = sum(1 for row in result["rows"] if row["slower"])
    print(f"{flagged} of {len(result['rows'])} rows slower by more than {100 * result['threshold']:.0f}%"
          + ("" if flagged else ": none"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_compare.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A", help="the revision before (a commit, branch or tag)")
    parser.add_argument("b", metavar="B", help="the revision after")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="runs of each side, alternating (3)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the bench (fewer repeats)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="pass --threads N to the bench")
    parser.add_argument("--suite", choices=("full", "tiny"), default="full", help="the bench's suite (full)")
    parser.add_argument("--bench", choices=("b", "own"), default="b",
                        help="b: B's bench times both libraries (default); own: each side runs its own bench")
    parser.add_argument("--threshold", type=float, default=0.05, metavar="F",
                        help="flag rows slower in B by more than this fraction (0.05)")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench-compare", metavar="DIR",
                        help="builds, the runtime venv, logs and JSON go here (default .bench-compare/)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the comparison as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: expected at least 1")

    shas = [git("rev-parse", "--verify", f"{rev}^{{commit}}") for rev in (args.a, args.b)]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = runtime_python(work)
    libs = [build(python, work, sha) for sha in shas]
    bench_src = libs[1] / "bncore" if args.bench == "b" else None
    sides = [prepare_side(work, name, lib, bench_src) for name, lib in zip("ab", libs)]
    for name, rev, sha, side in zip("AB", (args.a, args.b), shas, sides):
        log(f"{name} = {rev} ({sha[:12]}): bncore {check_side(python, side)} from {side}")

    bench_args = (["--quick"] if args.quick else []) + (["--suite", args.suite] if args.suite != "full" else []) \
        + ([f"--threads={args.threads}"] if args.threads is not None else [])
    results = work / "results" / time.strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True)
    reports: dict[str, list[dict]] = {"a": [], "b": []}
    for i in range(1, args.rounds + 1):
        for name, side in zip("ab", sides):
            json_path, log_path = results / f"{name}-{i}.json", results / f"{name}-{i}.txt"
            seconds = run_bench(python, side, json_path, bench_args, log_path)
            reports[name].append(json.loads(json_path.read_text()))
            load = reports[name][-1]["machine"].get("loadavg_start")
            log(f"round {i}/{args.rounds}, {name.upper()}: {seconds:.0f} s"
                + (f", load average at start {load[0]:.2f}" if load else "") + f"; table in {log_path}")

    result = compare(reports["a"], reports["b"], args.threshold)
    result.update({"a": {"rev": args.a, "sha": shas[0]}, "b": {"rev": args.b, "sha": shas[1]},
                   "rounds": args.rounds, "bench_args": bench_args, "bench": args.bench, "results": str(results)})
    print()
    print_table(result, f"{args.a} ({shas[0][:10]})", f"{args.b} ({shas[1][:10]})")
    print(f"each run's table and JSON: {results}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 1 if any(row["slower"] for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
