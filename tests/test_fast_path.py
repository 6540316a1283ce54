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
