"""bncore.torch.convert: what it finds, what it replaces and skips (and says why), subclasses,
transformers-style RMS norms, the registry with its probe check, hooks and repr."""
from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
import bncore.torch as bt  # noqa: E402

nn = torch.nn


class Float32RMSNorm(nn.Module):
    """The RMS norm of Llama / Mistral / Qwen2 models, written as transformers writes it."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class EpsRMSNorm(nn.Module):
    """The same with the epsilon in ``eps`` (no cast: float32 models)."""

    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class OnePlusRMSNorm(Float32RMSNorm):
    """Gemma-style: the weight is an offset from one. Not the same computation: the probe must refuse it."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).to(hidden_states.dtype)


class PlainSubclass(nn.LayerNorm):
    """torch's forward: converted, keeping its class."""

    def describe(self):
        return "mine"


class OwnForward(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) + 1


def _randomized(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 1)
    return module


def test_report_lists_replaced_and_skipped_with_reasons_and_logs_them(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), PlainSubclass(4), OwnForward(4), nn.LazyBatchNorm1d(),
                          nn.SyncBatchNorm(4), nn.LocalResponseNorm(2), bt.LayerNorm(4))
    with caplog.at_level(logging.INFO, logger="bncore.torch"):
        out, report = bt.convert(model, report=True)
    assert out is model
    replaced = {name: new for name, _, new in report.replaced}
    assert replaced == {"1": "bncore.BatchNorm1d", "2": "bncore.PlainSubclass"}
    skipped = {name: why for name, _, why in report.skipped}
    assert set(skipped) == {"3", "4", "5", "6", "7"}
    assert "overrides forward" in skipped["3"] and "lazy" in skipped["4"]
    assert "convert_sync_batchnorm" in skipped["5"] and "register" in skipped["6"]
    assert "already bncore" in skipped["7"]
    assert "2 replaced, 5 skipped" in str(report)
    assert "overrides forward" in caplog.text and "bncore.PlainSubclass" in caplog.text
    assert bt.convert(nn.Linear(2, 2), report=True)[1].replaced == []


def test_subclass_with_torch_forward_keeps_its_class_and_attributes():
    original = _randomized(PlainSubclass(6))
    original.note = "kept"
    converted = bt.convert(original)
    assert isinstance(converted, PlainSubclass) and isinstance(converted, bt._LayerNormForward)
    assert converted.describe() == "mine" and converted.note == "kept" and converted.weight is original.weight
    assert type(original) is PlainSubclass  # the original is left as it was
    x = torch.randn(3, 6)
    torch.testing.assert_close(converted(x), original(x))
    assert type(bt.convert(PlainSubclass(6))) is type(converted)  # one twin class per class


def test_repr_names_bncore():
    model = bt.convert(nn.Sequential(nn.BatchNorm2d(3), PlainSubclass(4), Float32RMSNorm(4)))
    text = repr(model)
    assert "bncore.BatchNorm2d(3, eps=1e-05" in text and "bncore.PlainSubclass((4,)" in text
    assert "bncore.Float32RMSNorm" in text


def test_hooks_are_carried_over_and_still_removable():
    calls = []
    bn = nn.BatchNorm1d(3)
    pre = bn.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__)))
    bn.register_forward_hook(lambda m, args, out: calls.append(("post", out.shape)))
    bn.register_forward_hook(lambda m, args, kwargs, out: calls.append(("kw", len(kwargs))), with_kwargs=True)
    model = bt.convert(nn.Sequential(bn))
    model(torch.randn(4, 3))
    assert calls == [("pre", "BatchNorm1d"), ("post", (4, 3)), ("kw", 0)]
    assert isinstance(model[0], bt.BatchNorm1d)
    pre.remove()
    calls.clear()
    model(torch.randn(4, 3))
    assert [c[0] for c in calls] == ["post", "kw"]


# EpsRMSNorm only in float32: without the cast to float32 the original itself computes in half precision
@pytest.mark.parametrize("cls, dtype", [(Float32RMSNorm, torch.float32), (Float32RMSNorm, torch.bfloat16),
                                        (Float32RMSNorm, torch.float16), (EpsRMSNorm, torch.float32)])
def test_llama_style_rms_norm_is_recognized_and_matches(cls, dtype):
    original = _randomized(cls(16))
    model, report = bt.convert(nn.Sequential(original), report=True)
    assert [new for _, _, new in report.replaced] == [f"bncore.{cls.__name__}"]
    assert isinstance(model[0], cls)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    got, want = model[0](x), original(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    x32 = x.float().requires_grad_(True)
    g_got = torch.autograd.grad(model[0](x32).sum(), (x32, model[0].weight))
    g_want = torch.autograd.grad(original(x32).sum(), (x32, original.weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_rms_lookalike_that_computes_otherwise_is_skipped_by_the_probe():
    model, report = bt.convert(nn.Sequential(_randomized(OnePlusRMSNorm(8))), report=True)
    assert report.replaced == [] and type(model[0]) is OnePlusRMSNorm
    ((_, _, why),) = report.skipped
    assert "probe" in why


def test_register_a_class_with_a_factory():
    class MyNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n) * 2)

        def forward(self, x):
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight)

    def factory(module):
        new = bt.LayerNorm(module.weight.shape[0], bias=False)
        new.weight = module.weight
        return new

    bt.register(MyNorm, factory)
    try:
        model, report = bt.convert(nn.Sequential(MyNorm(5)), report=True)
        assert isinstance(model[0], bt.LayerNorm) and report.replaced[0][2] == "bncore.LayerNorm"
        bt.register(MyNorm, lambda m: bt.LayerNorm(5))  # a weight of ones, not twos: the probe refuses it
        model, report = bt.convert(nn.Sequential(MyNorm(5)), report=True)
        assert type(model[0]) is MyNorm and "probe" in report.skipped[0][2]
        bt.register(MyNorm, lambda m: 1 / 0)
        model, report = bt.convert(nn.Sequential(MyNorm(5)), report=True)
        assert type(model[0]) is MyNorm and "ZeroDivisionError" in report.skipped[0][2]
    finally:
        bt._REGISTRY.pop(MyNorm, None)


def test_register_refuses_bad_arguments():
    with pytest.raises(TypeError, match="cls"):
        bt.register(int, lambda m: m)
    with pytest.raises(TypeError, match="factory"):
        bt.register(nn.LayerNorm, None)
    with pytest.raises(TypeError, match="probe"):
        bt.register(nn.LayerNorm, lambda m: m, probe=3)
    assert nn.LayerNorm not in bt._REGISTRY


def test_probe_changes_no_state():
    bn = nn.BatchNorm1d(3)
    bt.register(type(bn), lambda m: bt.as_bncore(m, bt._BatchNormForward), probe=lambda m: torch.randn(4, 3))
    try:
        model = bt.convert(nn.Sequential(bn))
    finally:
        bt._REGISTRY.pop(type(bn), None)
    assert isinstance(model[0], bt.BatchNorm1d)
    assert int(model[0].num_batches_tracked) == 0 and torch.equal(model[0].running_mean, torch.zeros(3))


def test_transformers_llama_and_bert_convert_and_match():
    transformers = pytest.importorskip("transformers", reason="transformers' models (a test extra)")
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model, norm_name in ((llama, "LlamaRMSNorm"), (bert, "LayerNorm")):
        with torch.no_grad():
            want = model(ids).last_hidden_state
        converted, report = bt.convert(model, report=True)
        assert report.replaced and not report.skipped
        assert all(new == f"bncore.{norm_name}" for _, _, new in report.replaced)
        with torch.no_grad():
            torch.testing.assert_close(converted(ids).last_hidden_state, want)
