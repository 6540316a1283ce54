"""The model bench (python -m bncore.bench.models) at its tiny size: both contenders step, start
from the same loss, and every normalization layer of the model was replaced by bncore's."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("torch", reason="the model bench trains PyTorch models")
from bncore.bench import models  # noqa: E402


def _check(r, threads):
    assert r["threads"] == threads and r["steps"] == 2
    assert r["norm_layers"] > 0 and r["replaced_layers"] == r["norm_layers"]
    assert r["losses_agree"], r["first_loss"]
    for name in ("torch", "bncore"):
        assert len(r["samples_ms"][name]) == 2 and r["ms"][name] > 0
        lo, hi = r["quartiles_ms"][name]
        assert lo <= r["ms"][name] <= hi or lo == hi


def test_resnet_tiny(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert models.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1", "2", "--models",
                        "resnet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["threads"] for r in result["results"]] == [1, 2]
    for r, n in zip(result["results"], (1, 2)):
        assert r["model"].startswith("resnet")
        _check(r, n)
    assert "resnet" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed: the BERT model is not built")
def test_bert_tiny():
    result = models.run(models.SIZES["tiny"], [1], steps=2, warmup=1, models=["bert"], echo=lambda s: None)
    assert not result["skipped"]
    (r,) = result["results"]
    assert r["model"].startswith("bert")
    _check(r, 1)


def test_bert_missing_is_reported(monkeypatch):
    def no_transformers(torch, size):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(models, "bert_workload", no_transformers)
    lines = []
    result = models.run(models.SIZES["tiny"], [1], steps=1, warmup=1, models=["bert"], echo=lines.append)
    assert result["results"] == [] and "transformers" in result["skipped"]["bert"]
    assert any("skipped" in line for line in lines)


def test_bad_arguments():
    assert models.main(["--steps", "0"]) == 2
