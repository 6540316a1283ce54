#!/usr/bin/env python3
"""Mutation check: plant each bug of tools/mutants.toml, rebuild, run the tests that should catch it,
restore the file. Every mutant must be killed (its tests fail); the script exits non-zero when one
survives, when a snippet is not found (the code moved: update tools/mutants.toml), or when a mutant
does not build.

    python tools/mutate.py               # every mutant
    python tools/mutate.py --list        # the list, nothing run
    python tools/mutate.py --only NAME   # one (repeatable)

Run it inside the development venv, from anywhere in the repository. C mutants are rebuilt with
``pip install --no-build-isolation -e .`` into a build directory of their own (build/mutate, so that
rebuilds are incremental); Python mutants need no rebuild (the editable install reads src/). Each file
is restored in a ``finally`` (Ctrl-C included) and checked against its saved bytes and ``git diff``;
the clean tree is rebuilt at the end when a C mutant was built.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "tools" / "mutants.toml"
BUILD_DIR = "build/mutate"
TEST_TIMEOUT_S = 900


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    mutated: str
    tests: list
    why: str

    @property
    def needs_build(self) -> bool:
        return not self.file.endswith(".py")


def load(path: Path = MUTANTS) -> list[Mutant]:
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    mutants = [Mutant(**m) for m in spec["mutant"]]
    names = [m.name for m in mutants]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"{path}: duplicate mutant names {sorted(dupes)}")
    return mutants


def rebuild(quiet: bool = True) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "-e", ".",
           f"--config-settings=build-dir={BUILD_DIR}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    if proc.returncode != 0 and quiet:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return proc.returncode == 0


def git_clean(file: str) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", file], cwd=ROOT).returncode == 0


def run_tests(tests: list) -> int:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--hypothesis-seed=0", *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S,
                              env=env).returncode
    except subprocess.TimeoutExpired:
        return -1


def try_mutant(m: Mutant) -> str:
    """Plants `m`, runs its tests, restores the file. Returns killed / survived / a failure of the script."""
    path = ROOT / m.file
    if not path.exists():
        return "file not found"
    saved = path.read_bytes()
    text = saved.decode()
    count = text.count(m.original)
    if count != 1:
        return "snippet not found" if count == 0 else f"snippet found {count} times"
    was_clean = git_clean(m.file)
    try:
        path.write_text(text.replace(m.original, m.mutated, 1))
        if m.needs_build and not rebuild():
            return "build failed"
        rc = run_tests(m.tests)
    finally:
        path.write_bytes(saved)
        if path.read_bytes() != saved or (was_clean and not git_clean(m.file)):
            raise SystemExit(f"{m.file}: NOT restored; check `git diff {m.file}`")
    if rc == 1:  # tests failed: the bug was seen
        return "killed"
    if rc == 0:
        return "survived"
    if rc == -1:
        return "tests timed out"
    return f"pytest exit {rc} (bad selection?)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument("--mutants", type=Path, default=MUTANTS, help="the mutant list (default tools/mutants.toml)")
    args = ap.parse_args(argv)
    mutants = load(args.mutants)
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            ap.error(f"unknown mutants {sorted(unknown)}; see --list")
        mutants = [m for m in mutants if m.name in args.only]
    width = max(len(m.name) for m in mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name:<{width}}  {m.file:<26} {' '.join(m.tests):<44} {m.why}")
        return 0
    results = []
    built = False
    try:
        for m in mutants:
            start = time.monotonic()
            print(f"{m.name} ...", end=" ", flush=True)
            result = try_mutant(m)
            built |= m.needs_build
            seconds = time.monotonic() - start
            print(f"{result} ({seconds:.0f} s)", flush=True)
            results.append((m, result, seconds))
    finally:
        if built:
            print("rebuilding the clean tree ...", flush=True)
            if not rebuild():
                print("the clean rebuild FAILED: run pip install --no-build-isolation -e . by hand", file=sys.stderr)
    print()
    print(f"| {'mutant':<{width}} | {'result':<17} | seconds |")
    print(f"|{'-' * (width + 2)}|{'-' * 19}|---------|")
    for m, result, seconds in results:
        print(f"| {m.name:<{width}} | {result:<17} | {seconds:7.0f} |")
    killed = sum(r == "killed" for _, r, _ in results)
    print(f"\n{killed} of {len(results)} killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
