"""`python -m bncore bench` on its hidden tiny suite: the table and the JSON hold every case,
every number is positive and finite. Nothing here asserts a speed."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import bncore
from bncore import bench
from bncore.__main__ import main

try:
    import torch
except ImportError:  # the bench runs without PyTorch: no torch column, no bfloat16 cases
    torch = None


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _expected_cases(with_torch):
    return [c for c in bench.tiny_suite().cases if with_torch or c.dtype == "float32"]


def _check_report(report, with_torch, threads):
    assert report["settings"]["threads"] == threads
    assert report["settings"]["suite"] == "tiny"
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["threads"] == threads
    assert machine["versions"]["bncore"] == bncore.__version__
    assert ("torch" in machine["versions"]) == with_torch

    bw = report["bandwidth"]
    for key in ("dram", "cache"):
        assert _positive(bw[key]["gbps"]) and all(_positive(s) for s in bw[key]["samples"])

    cases = report["cases"]
    expected = _expected_cases(with_torch)
    assert [(c["op"], c["pass"], tuple(c["shape"]), c["dtype"], c["layout"]) for c in cases] == \
        [(c.op, c.kind, c.shape, c.dtype, c.layout) for c in expected]
    for c in cases:
        assert c["repeats"] >= bench.QUICK.least
        assert c["bytes"] == math.prod(c["shape"]) * (2 if c["dtype"] in ("bfloat16", "float16") else 4) * \
            (3 if c["pass"] == "bwd" else 2)
        present = {"bncore", "bncore_alloc"} | \
            ({"torch"} if with_torch else set()) | ({"numpy"} if c["dtype"] == "float32" else set())
        for name in bench.CONTENDERS:
            if name in present:
                assert _positive(c["ms"][name]), (c["name"], name)
                assert _positive(c["gbps"][name]) and _positive(c["pct_of_dram_copy"][name])
                assert len(c["samples_ms"][name]) == c["repeats"]
                # (the samples are rounded to 1 ns)
                assert 0 < c["ms_min"][name] <= c["ms"][name] <= max(c["samples_ms"][name]) + 1e-5
            else:
                assert c["ms"][name] is None and c["gbps"][name] is None
        assert c["alloc_over_out"] == pytest.approx(c["ms"]["bncore_alloc"] / c["ms"]["bncore"])
        if with_torch:
            assert _positive(c["speedup_vs_torch"]) and _positive(c["speedup_vs_torch_allocating"])
            assert c["torch_call"]
        else:
            assert c["speedup_vs_torch"] is None and c["speedup_vs_torch_allocating"] is None
        # every contender's outputs match bncore.reference (float64) within the dtype's tolerance
        assert c["agrees"], (c["name"], c["layout"], c["max_error_vs_reference"])
        assert set(c["max_error_vs_reference"]) == present
        assert all(0 <= e <= c["tolerance"] for e in c["max_error_vs_reference"].values())
        assert isinstance(c["fits_llc"], bool)

    us = report["overhead"]["us"]
    assert _positive(us["bncore"])
    assert _positive(us["torch"]) if with_torch else us["torch"] is None


def _check_table(out, report):
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert "ms per call" in lines[head - 1] and "speed-up" in lines[head - 1]
    for col in ("bncore", "alloc", "torch", "numpy", "a/out", "out=", "GB/s", "% copy"):
        assert col in lines[head]
    assert set(lines[head + 1]) == {"-"}
    rows = lines[head + 2: head + 2 + len(report["cases"])]
    assert all(len(line) <= 100 for line in lines[head - 1: head + 2 + len(rows)])  # fits a 100-column terminal
    for line, case in zip(rows, report["cases"]):
        assert line.startswith(case["name"]) and case["dtype"] in line and case["layout"] in line
        cells = line.split()
        assert cells[-1].rstrip("*").endswith("%")
        assert cells[-1].endswith("*") == case["fits_llc"]  # marked: its bytes fit in the last-level cache
        assert math.isfinite(float(cells[-2])) and float(cells[-2]) > 0  # GB/s, printed to 2 significant digits
    assert "DRAM" in out and "in-cache" in out and "Python overhead" in out
    us = report["overhead"]["us"]
    if us["torch"] is not None:  # stated as in the table: torch time / bncore time
        assert f"speed-up {us['torch'] / us['bncore']:.2f}x (torch / bncore)" in out


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
def test_bench_tiny_with_torch(tmp_path, capsys):
    path = tmp_path / "bench.json"
    before = bncore.get_num_threads(), torch.get_num_threads()
    assert main(["bench", "--suite", "tiny", "--quick", "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    _check_report(report, with_torch=True, threads=1)
    _check_table(out, report)
    assert (bncore.get_num_threads(), torch.get_num_threads()) == before  # restored


def test_bench_tiny_without_torch(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--suite", "tiny", "--quick", "--threads", "2", "--no-torch", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    _check_report(report, with_torch=False, threads=2)
    _check_table(out, report)
    assert "torch" not in report["machine"]["versions"]


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedups.png"
    assert main(["bench", "--suite", "tiny", "--quick", "--threads", "1", "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_only_times_the_matching_cases(tmp_path, capsys):
    path = tmp_path / "only.json"
    assert main(["bench", "--suite", "tiny", "--quick", "--threads", "1", "--only", "rms_norm fwd",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["settings"]["only"] == "rms_norm fwd"
    assert [(c["op"], c["pass"]) for c in report["cases"]] == [("rms_norm", "fwd")]
    assert report["cases"][0]["agrees"], report["cases"][0]["max_error_vs_reference"]
    assert "fused" not in report and "distributed" not in report
    assert main(["bench", "--suite", "tiny", "--quick", "--only", "no_such_norm"]) == 2
    assert "no case of the tiny suite matches 'no_such_norm'" in capsys.readouterr().err


def test_bench_rejects_bad_threads(capsys):
    assert main(["bench", "--suite", "tiny", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_bench_in_help():
    out = subprocess.run([sys.executable, "-m", "bncore", "--help"], capture_output=True, text=True, check=True).stdout
    assert "bench" in out
    out = subprocess.run([sys.executable, "-m", "bncore", "bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for opt in ("--quick", "--threads", "--json", "--plot"):
        assert opt in out
    assert "--suite" not in out and "--no-torch" not in out  # hidden, for tests


def test_version_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    main(["version"])
    assert out == capsys.readouterr().out == f"bncore {bncore.__version__} (C library {bncore.__version__})\n"


def test_numpy_contender_is_the_reference():
    """The NumPy contender times bncore.reference itself, at the input's dtype: no second copy of the formulas."""
    from bncore import reference
    from bncore.bench import contenders

    case = bench.Case("group_norm", "bwd", (2, 8, 4, 4), "float32", "NCHW", 4)
    fns, _, d = contenders.build(case, None)
    dx, dw, db = fns["numpy"]()
    assert dx.dtype == np.float32
    _, mean, rstd = reference.group_norm_ref(d.xn, 4, d.pn["w"], d.pn["b"], dtype=np.float32)
    expected = reference.group_norm_backward_ref(d.dyn, d.xn, 4, d.pn["w"], saved_mean=mean, saved_rstd=rstd,
                                                 dtype=np.float32)
    for got, want in zip((dx, dw, db), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bench_compare_flags_rows_slower_by_more_than_the_threshold():
    """tools/bench_compare.py: per row, the median over the rounds of each side (a disturbed round does
    not count), B/A, and a flag when bncore (out= or allocating) is slower in B by more than the threshold."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_compare.py"
    spec = importlib.util.spec_from_file_location("bench_compare", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def report(fwd_ms, bwd_ms, torch_ms):
        """One round: a forward row (bncore, allocating and torch) and a backward row (bncore and torch)."""
        row = {"shape": [4, 8], "dtype": "float32", "layout": "NC"}
        return {"cases": [dict(row, name="batch_norm fwd-train",
                               ms={"bncore": fwd_ms, "bncore_alloc": fwd_ms, "torch": torch_ms, "numpy": None}),
                          dict(row, name="batch_norm bwd",
                               ms={"bncore": bwd_ms, "bncore_alloc": None, "torch": torch_ms, "numpy": None})],
                "overhead": {"us": {"bncore": 5.0, "torch": 8.0}}}

    a = [report(1.0, 2.0, 1.0), report(1.0, 2.0, 1.0), report(9.0, 9.0, 9.0)]  # a disturbed round
    b = [report(1.04, 2.2, 3.0), report(1.04, 2.2, 3.0), report(1.04, 2.2, 3.0)]
    result = tool.compare(a, b, threshold=0.05)
    rows = {row["key"][0]: row for row in result["rows"]}
    assert rows["batch_norm fwd-train"]["slower"] == []  # 4% slower (and torch 3x, never flagged)
    assert rows["batch_norm bwd"]["slower"] == ["bncore"]  # 10% slower
    assert math.isclose(rows["batch_norm bwd"]["b_over_a"]["bncore"], 1.1)
    assert result["only_in_a"] == result["only_in_b"] == []


def test_fused_case_runs_checks_and_reports():
    from bncore.bench import fused

    r = fused.run((4, 8, 6, 6), quick=True, torch=None)
    assert set(r["ms"]) == {"fused", "unfused"} and r["agrees"]
    assert r["speedup_fused_vs_unfused"] == r["ms"]["unfused"] / r["ms"]["fused"]
    assert "fused vs unfused" in fused.report(r)


def test_fused_case_with_torch_times_torch_bn_relu_like_for_like():
    torch = pytest.importorskip("torch")
    from bncore.bench import fused

    r = fused.run((4, 8, 6, 6), quick=True, torch=torch)
    assert set(r["ms"]) == {"fused", "unfused", "torch", "fused_alloc", "torch_alloc"} and r["agrees"]
    assert r["speedup_fused_vs_torch_allocating"] == r["ms"]["torch_alloc"] / r["ms"]["fused_alloc"]
    assert "allocating, fused vs torch BN + ReLU" in fused.report(r)
