"""bncore.batch_norm on PyTorch tensors takes a fast path (borrowed views through torch's DLPack C
exchange API, one C call). It must give the full path's results bit for bit, and fall back to the
full path, which raises the explaining error, for anything unusual."""
import numpy as np
import pytest

import bncore

torch = pytest.importorskip("torch", reason="the fast path is for PyTorch tensors")

CASES = [
    ((8, 4), 1), ((6, 5, 7), 1), ((4, 3, 5, 6), 1), ((4, 3, 5, 6), -1), ((2, 3, 4, 5, 6), 1),
]


def _data(shape, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fast_path_equals_full_path_bitwise(shape, axis, training, affine):
    x = _data(shape, 1)
    c = shape[axis]
    w = torch.rand(c) + 0.5 if affine else None
    b = torch.randn(c) if affine else None
    rm1, rv1 = torch.randn(c), torch.rand(c) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    fast = bncore.batch_norm(x, rm1, rv1, w, b, training, 0.3, 1e-4, axis=axis)
    full = bncore.batch_norm_forward(x, rm2, rv2, w, b, training, 0.3, 1e-4, axis=axis)[0]
    assert type(fast) is torch.Tensor and fast.dtype == x.dtype
    assert torch.equal(fast, full)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


def test_fast_path_keeps_channels_last_and_matches_torch():
    x = _data((4, 6, 5, 5), 2, channels_last=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    rmt, rvt = rm.clone(), rv.clone()
    y = bncore.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    yt = torch.nn.functional.batch_norm(x, rmt, rvt, None, None, True, 0.1, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rmt)
    torch.testing.assert_close(rv, rvt)


def test_fast_path_reads_tensors_that_require_grad():
    """Without grad mode the fast path reads them (no graph); with it the call is differentiable
    (bncore's registered op), with the same bits."""
    x = _data((8, 3), 3).requires_grad_(True)
    w = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        y = bncore.batch_norm(x, None, None, w, None, True)
    assert not y.requires_grad
    expected = bncore.batch_norm_forward(x.detach(), None, None, w.detach(), None, True)[0]
    assert torch.equal(y, expected)
    y = bncore.batch_norm(x, None, None, w, None, True)
    assert y.requires_grad and torch.equal(y.detach(), expected)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, rm, rv: bncore.batch_norm(x, None, None, training=False), RuntimeError,
     "running_mean must be defined"),
    (lambda x, rm, rv: bncore.batch_norm(x[:1, :, 0, 0], rm, rv, training=True), ValueError,
     "more than 1 value per channel"),
    (lambda x, rm, rv: bncore.batch_norm(x, rm, rv, torch.ones(4), None, True), ValueError, "weight"),
    (lambda x, rm, rv: bncore.batch_norm(x, rm, rv, None, None, True, 1.5), ValueError, "momentum"),
    (lambda x, rm, rv: bncore.batch_norm(x, rm, rv, None, None, True, 0.1, -1.0), ValueError, "eps"),
    (lambda x, rm, rv: bncore.batch_norm(x.to(torch.int32), rm, rv, training=True), TypeError, "floating"),
    (lambda x, rm, rv: bncore.batch_norm(x, rm, rv, training=True, axis=7), ValueError, "axis"),
])
def test_unusual_calls_fall_back_and_explain(call, error, words):
    x = _data((4, 3, 5, 5), 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = (rm.clone(), rv.clone())
    with pytest.raises(error, match=words):
        call(x, rm, rv)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_numpy_inputs_take_the_full_path_with_the_same_numbers():
    x = _data((6, 4, 3), 5)
    y_torch = bncore.batch_norm(x, None, None, training=True)
    y_numpy = bncore.batch_norm(x.numpy(), None, None, training=True)
    assert isinstance(y_numpy, np.ndarray)
    np.testing.assert_array_equal(y_torch.numpy(), y_numpy)


@pytest.mark.parametrize("bad", [
    {"momentum": True}, {"momentum": "0.1"}, {"eps": True}, {"eps": -1.0}, {"axis": 1.0}, {"axis": True},
    {"momentum": [0.1]},
])
def test_remembered_descriptions_never_skip_a_check(bad):
    """The fast path remembers a call's checked description by its scalars *with their types*: a
    bad scalar equal to a good one (True == 1, 1.0 == 1) or unhashable still reaches the checks."""
    from bncore import functional
    x, rm, rv = _data((8, 4), 3), torch.zeros(4), torch.ones(4)
    args = {"momentum": 1, "eps": 1, "axis": 1}
    bncore.batch_norm(x, rm, rv, training=True, **args)  # remembered
    assert functional._SMALL_DESCS
    before = rm.clone(), rv.clone()
    with pytest.raises((TypeError, ValueError)):
        bncore.batch_norm(x, rm, rv, training=True, **{**args, **bad})
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_remembered_descriptions_are_bounded():
    from bncore import functional
    for n in range(2, 2 + functional._SMALL_DESCS_MAX + 10):
        bncore.batch_norm(_data((n, 3), n), training=True)
    assert 0 < len(functional._SMALL_DESCS) <= functional._SMALL_DESCS_MAX


def test_fast_path_bumps_the_running_statistics_versions():
    x, rm, rv = _data((8, 4), 4), torch.zeros(4), torch.ones(4)
    v = rm._version, rv._version
    bncore.batch_norm(x, rm, rv, training=True)
    assert rm._version > v[0] and rv._version > v[1]


@pytest.mark.parametrize("torch_side", ["running_mean", "running_var"])
def test_running_statistics_of_two_families(torch_side):
    """Found by the fuzz harness: a torch running_mean with a NumPy running_var (or the reverse)
    crashed the fast path's autograd test with AttributeError; the checked path takes the call."""
    x = _data((8, 4), 5)
    rm = torch.zeros(4) if torch_side == "running_mean" else np.zeros(4, np.float32)
    rv = torch.ones(4) if torch_side == "running_var" else np.ones(4, np.float32)
    y = bncore.batch_norm(x, rm, rv, training=True)
    xd = x.double().numpy()
    np.testing.assert_allclose(np.asarray(rm), 0.1 * xd.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rv), 0.9 + 0.1 * xd.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(y.numpy(), (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
def test_out_takes_the_fast_path_with_the_full_paths_bits(shape, axis, training, in_place, monkeypatch):
    """batch_norm(..., out=) on PyTorch tensors: one C call into `out` (the checked path is not
    entered), the same bits and running statistics as batch_norm_forward(out=), and `out` itself
    returned; out may be the input (in place)."""
    from bncore import functional
    c = shape[axis]
    x1, x2 = _data(shape, 6), _data(shape, 6)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm1, rv1 = torch.randn(c), torch.rand(c) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    out1 = x1 if in_place else torch.empty_like(x1)
    out2 = x2 if in_place else torch.empty_like(x2)
    full = bncore.batch_norm_forward(x2, rm2, rv2, w, b, training, 0.3, 1e-4, axis=axis, out=out2)[0]
    entered = []
    checked = functional.batch_norm_forward
    monkeypatch.setattr(functional, "batch_norm_forward", lambda *a, **k: entered.append(1) or checked(*a, **k))
    v = out1._version, rm1._version
    y = bncore.batch_norm(x1, rm1, rv1, w, b, training, 0.3, 1e-4, axis=axis, out=out1)
    assert not entered, "the out= call left the fast path"
    assert y is out1 and torch.equal(y, full)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    assert out1._version > v[0]  # autograd learns of the write, as the checked path tells it
    assert (rm1._version > v[1]) == training


@pytest.mark.parametrize("bad_out, words", [
    (lambda x: torch.empty(x.shape[0] + 1, *x.shape[1:]), "out"),
    (lambda x: torch.empty_like(x, dtype=torch.float64), "out"),
    (lambda x: torch.empty_like(x, requires_grad=True), None),
    (lambda x: np.empty(tuple(x.shape), np.float32), None),
])
def test_out_fast_path_falls_back_for_what_it_cannot_take(bad_out, words):
    """A wrong or unusual out= gives exactly the checked path's outcome (its error, with the
    running statistics untouched, or its result)."""
    x = _data((6, 4, 3), 7)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    outcome = []
    for call in (bncore.batch_norm, lambda *a, **k: bncore.batch_norm_forward(*a, **k)[0]):
        o, r1, r2 = bad_out(x), rm.clone(), rv.clone()
        try:
            got = call(x, r1, r2, None, None, True, 0.1, 1e-5, out=o)
            outcome.append(("ok", np.asarray(got.detach() if hasattr(got, "detach") else got).copy(), r1, r2))
        except Exception as err:  # noqa: BLE001 - the two paths' outcomes are compared, whatever they are
            outcome.append((type(err), str(err), r1, r2))
            assert torch.equal(r1, rm) and torch.equal(r2, rv)
    (k1, v1, a1, b1), (k2, v2, a2, b2) = outcome
    assert k1 == k2
    if k1 == "ok":
        np.testing.assert_array_equal(v1, v2)
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    else:
        assert v1 == v2 and (words is None or words in v1)


# ---------------------------------------------------------------- the backward's one-call path


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("into", ["new", "out", "grad_output"])
def test_backward_fast_path_equals_checked_path_bitwise(shape, axis, training, affine, into, monkeypatch):
    """batch_norm_backward on PyTorch tensors: one C call (the checked path is not entered), the
    checked path's bits, strides and dtypes; out= is returned (and its version advanced), and may be
    grad_output itself."""
    from bncore import functional
    c = shape[axis]
    x = _data(shape, 8)
    w = torch.rand(c) + 0.5 if affine else None
    _, sm, si = bncore.batch_norm_forward(x, None, None, w, None, True, axis=axis)

    def call(dy):
        out = {"new": None, "out": torch.empty_like(dy), "grad_output": dy}[into]
        return bncore.batch_norm_backward(dy, x, w, sm, si, training=training, axis=axis, out=out), out

    with monkeypatch.context() as m:
        m.setattr(functional, "_batch_norm_backward_small", lambda *a, **k: None)
        want, _ = call(_data(shape, 9))
    entered = []
    setup = functional._batch_setup
    monkeypatch.setattr(functional, "_batch_setup", lambda *a, **k: entered.append(1) or setup(*a, **k))
    dy = _data(shape, 9)
    version = dy._version
    got, out = call(dy)
    assert not entered, "the backward left the one-call path"
    assert out is None or (got[0] is out and out._version > version)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.equal(g, e) and g.stride() == e.stride() and g.dtype == e.dtype


def _np(t):
    return np.asarray(t.detach() if hasattr(t, "detach") else t).copy()


def _outcome(fn):
    """What a call gives: ("ok", its outputs as NumPy) or (its error's type, its message)."""
    try:
        got = fn()
    except Exception as err:  # noqa: BLE001 - the two paths' outcomes are compared, whatever they are
        return type(err), str(err)
    got = got if isinstance(got, tuple) else (got,)
    return "ok", [None if g is None else _np(g) for g in got]


def _same_outcome(a, b):
    assert a[0] == b[0], (a, b)
    if a[0] != "ok":
        assert a[1] == b[1]
        return
    for u, v in zip(a[1], b[1]):
        assert (u is None) == (v is None)
        if u is not None:
            np.testing.assert_array_equal(u, v)


# one changed argument each (made afresh per call: a call may write it): the one-call paths must
# give exactly the checked path's outcome (found by this test: a (C, 1) or (1, C) weight passed the
# C core's element count, and the fast path took it)
_C = 4
_BAD_FORWARD = {
    "weight (C, 1)": lambda: {"weight": torch.ones(_C, 1)},
    "weight (1, C)": lambda: {"weight": torch.ones(1, _C)},
    "bias (1, C)": lambda: {"bias": torch.zeros(1, _C)},
    "weight int": lambda: {"weight": torch.ones(_C, dtype=torch.int32)},
    "weight float64": lambda: {"weight": torch.ones(_C, dtype=torch.float64)},
    "weight strided": lambda: {"weight": torch.ones(2 * _C)[::2]},
    "weight 0-d": lambda: {"weight": torch.tensor(1.0)},
    "running_mean (C, 1)": lambda: {"running_mean": torch.zeros(_C, 1)},
    "running_var float16": lambda: {"running_var": torch.ones(_C, dtype=torch.float16)},
    "running_var short": lambda: {"running_var": torch.ones(_C - 1)},
    "weight numpy": lambda: {"weight": np.ones(_C, np.float32)},
}
_BAD_BACKWARD = {
    "weight (C, 1)": lambda: {"weight": torch.ones(_C, 1)},
    "weight (1, C)": lambda: {"weight": torch.ones(1, _C)},
    "weight int": lambda: {"weight": torch.ones(_C, dtype=torch.int32)},
    "weight float64": lambda: {"weight": torch.ones(_C, dtype=torch.float64)},
    "weight none": lambda: {"weight": None},
    "save_mean (1, C)": lambda: {"save_mean": torch.zeros(1, _C)},
    "save_invstd (C, 1)": lambda: {"save_invstd": torch.ones(_C, 1)},
    "save_invstd none": lambda: {"save_invstd": None},
    "save_mean none": lambda: {"save_mean": None},
    "save_mean float64": lambda: {"save_mean": torch.zeros(_C, dtype=torch.float64)},
    "save_invstd short": lambda: {"save_invstd": torch.ones(_C + 1)},
    "grad_output float64": lambda: {"grad_output": torch.ones(6, _C, 3, dtype=torch.float64)},
    "grad_output int": lambda: {"grad_output": torch.ones(6, _C, 3, dtype=torch.int32)},
    "grad_output shape": lambda: {"grad_output": torch.ones(6, _C, 4)},
    "grad_output expanded": lambda: {"grad_output": torch.ones(()).expand(6, _C, 3)},
    "grad_output numpy": lambda: {"grad_output": np.ones((6, _C, 3), np.float32)},
    "out float64": lambda: {"out": torch.empty(6, _C, 3, dtype=torch.float64)},
    "out shape": lambda: {"out": torch.empty(6, _C)},
    "out requires grad": lambda: {"out": torch.empty(6, _C, 3, requires_grad=True)},
    "out expanded": lambda: {"out": torch.empty(1, 1, 1).expand(6, _C, 3)},
    "out numpy": lambda: {"out": np.empty((6, _C, 3), np.float32)},
    "axis 3": lambda: {"axis": 3},
    "axis True": lambda: {"axis": True},
    "axis 1.0": lambda: {"axis": 1.0},
    "axis -1": lambda: {"axis": -1},
    "axis list": lambda: {"axis": [1]},
    "training 0": lambda: {"training": 0},
}


@pytest.mark.parametrize("change", list(_BAD_FORWARD), ids=str)
@pytest.mark.parametrize("with_out", [False, True])
def test_forward_fast_path_gives_the_checked_paths_outcome(change, with_out, monkeypatch):
    from bncore import functional
    x = _data((6, _C, 3), 10)

    def run():
        torch.manual_seed(0)
        args = {"weight": torch.rand(_C) + 0.5, "bias": torch.randn(_C), "running_mean": torch.zeros(_C),
                "running_var": torch.ones(_C), **_BAD_FORWARD[change]()}
        out = torch.empty_like(x) if with_out else None
        got = _outcome(lambda: bncore.batch_norm(x, args["running_mean"], args["running_var"], args["weight"],
                                                 args["bias"], True, 0.1, 1e-5, out=out))
        return got, _outcome(lambda: (args["running_mean"], args["running_var"]))

    fast = run()
    monkeypatch.setattr(functional, "_batch_norm_small", lambda *a, **k: None)
    checked = run()
    for a, b in zip(fast, checked):
        _same_outcome(a, b)


@pytest.mark.parametrize("change", list(_BAD_BACKWARD), ids=str)
def test_backward_fast_path_gives_the_checked_paths_outcome(change, monkeypatch):
    from bncore import functional
    x = _data((6, _C, 3), 11)
    _, sm, si = bncore.batch_norm_forward(x, None, None, None, None, True)

    def run():
        torch.manual_seed(0)
        args = {"grad_output": _data((6, _C, 3), 12), "weight": torch.rand(_C) + 0.5, "save_mean": sm,
                "save_invstd": si, "out": None, "axis": 1, "training": True, **_BAD_BACKWARD[change]()}
        out = args["out"]
        before = None if out is None else _np(out)
        got = _outcome(lambda: bncore.batch_norm_backward(args["grad_output"], x, args["weight"], args["save_mean"],
                                                          args["save_invstd"], training=args["training"],
                                                          axis=args["axis"], out=out))
        if got[0] != "ok" and out is not None:  # a refused call wrote nothing
            np.testing.assert_array_equal(_np(out), before)
        return got

    fast = run()
    monkeypatch.setattr(functional, "_batch_norm_backward_small", lambda *a, **k: None)
    _same_outcome(fast, run())
