"""Batch renormalization, ghost batch norm and the fused BN + ReLU on PyTorch: the functional API with
autograd, the fused modules (BatchNormReLU*d) and `bncore.torch.fuse` (the renorm and ghost modules:
tests/test_torch_renorm.py), against float64 references written from the formulas (bncore.reference) and
against autograd through torch's own ops."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch adapter's tests need PyTorch")
F = torch.nn.functional

import bncore  # noqa: E402
import bncore.torch as bt  # noqa: E402
from bncore.reference import (batch_renorm_backward_ref, batch_renorm_ref,  # noqa: E402
                              fused_batch_norm_backward_ref, fused_batch_norm_ref, ghost_batch_norm_backward_ref,
                              ghost_batch_norm_ref)
from tolerances import assert_close, to_numpy64  # noqa: E402

SHAPES = {1: (8, 3), 2: (8, 3, 5, 4), 3: (8, 3, 2, 3, 4)}  # BatchNorm1d / 2d / 3d inputs


def _data(shape, dtype=torch.float64, seed=0, scale=1.5, shift=0.3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def _params(c, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    return w, b


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------- the functional API, differentiable


@pytest.mark.parametrize("v", [2, 4])
@pytest.mark.parametrize("with_running", [False, True])
def test_ghost_batch_norm_gradcheck_and_reference(v, with_running):
    x, (w, b) = _data((8, 3, 4)), _params(3)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x, w, b = _leaves(x, w, b)

    def f(x, w, b):
        return bncore.batch_norm(x, rm.clone() if with_running else None, rv.clone() if with_running else None,
                                 w, b, True, virtual_batch_size=v)

    assert torch.autograd.gradcheck(f, (x, w, b))
    y = f(x, w, b)
    assert_close(y, ghost_batch_norm_ref(to_numpy64(x), v, to_numpy64(w), to_numpy64(b))[0], torch.float64)
    dy = _data(x.shape, seed=5)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    edx, edw, edb = ghost_batch_norm_backward_ref(to_numpy64(dy), to_numpy64(x), v, to_numpy64(w))
    for got, want in ((dx, edx), (dw, edw), (db, edb)):
        assert_close(got, want, torch.float64, "grad")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_gradcheck_and_reference(residual, training):
    x, (w, b) = _data((6, 3, 5)), _params(3)
    res = _data((6, 3, 5), seed=3) if residual else None
    rm, rv = torch.full((3,), 0.2, dtype=torch.float64), torch.full((3,), 1.7, dtype=torch.float64)
    x, w, b = _leaves(x, w, b)
    inputs = (x, w, b) + ((_leaves(res)[0],) if residual else ())

    def f(x, w, b, r=None):
        return bncore.batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation="relu", residual=r)

    assert torch.autograd.gradcheck(f, inputs)
    y = f(*inputs)
    stats = {} if training else {"running_mean": rm.numpy(), "running_var": rv.numpy()}
    want = fused_batch_norm_ref(to_numpy64(x), to_numpy64(w), to_numpy64(b), residual=to_numpy64(res) if residual
                                else None, activation="relu", **stats)[0]
    assert_close(y, want, torch.float64)
    assert (want > 0).any() and (want == 0).any()  # the mask matters
    dy = _data(x.shape, seed=7)
    grads = torch.autograd.grad(y, inputs, dy)
    expected = fused_batch_norm_backward_ref(to_numpy64(dy), to_numpy64(x), want, to_numpy64(w),
                                             activation="relu", **stats)
    for got, exp in zip(grads, expected):
        assert_close(got, exp, torch.float64, "grad")


def test_fused_matches_torch_autograd_in_float32():
    """The fused op's gradients against autograd through torch's own BN, add and ReLU."""
    x, (w, b), res = _data((16, 4, 6, 6), torch.float32), _params(4, torch.float32), _data((16, 4, 6, 6),
                                                                                          torch.float32, seed=9)
    ours, theirs = _leaves(x, w, b, res), _leaves(x, w, b, res)
    y1 = bncore.batch_norm(ours[0], None, None, ours[1], ours[2], True, activation="relu", residual=ours[3])
    y2 = torch.relu(F.batch_norm(theirs[0], None, None, theirs[1], theirs[2], True) + theirs[3])
    assert_close(y1, y2.detach(), torch.float32)
    dy = _data(x.shape, torch.float32, seed=2)
    for a, e in zip(torch.autograd.grad(y1, ours, dy), torch.autograd.grad(y2, theirs, dy)):
        assert_close(a, e, torch.float32, "grad")


def test_renorm_gradcheck_where_every_factor_is_clipped():
    """With r and d clipped in every channel they are truly constant, so the finite differences of
    gradcheck see exactly the formula the backward implements."""
    x, (w, b) = _data((8, 3, 4)), _params(3)
    rm, rv = torch.full((3,), 5.0, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64)
    x, w, b = _leaves(x, w, b)
    _, _, _, r, d = batch_renorm_ref(to_numpy64(x), rm.numpy(), rv.numpy(), rmax=1.5, dmax=0.5)
    assert np.all(r == 1.5) and np.all(d == -0.5)
    assert torch.autograd.gradcheck(
        lambda x, w, b: bncore.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, rmax=1.5, dmax=0.5), (x, w, b))


@pytest.mark.parametrize("axis", [1, -1])
def test_renorm_forward_backward_and_running_stats_match_reference(axis):
    """Unclipped and clipped channels mixed; gradients treat r and d as constants (the paper's rule)."""
    x, (w, b) = _data((10, 4, 3) if axis == 1 else (10, 3, 4)), _params(4)
    rm = torch.tensor([0.3, -0.2, 5.0, 0.1], dtype=torch.float64)
    rv = torch.tensor([2.0, 1.8, 0.01, 3.0], dtype=torch.float64)
    x, w, b = _leaves(x, w, b)
    new_rm, new_rv = rm.clone(), rv.clone()
    y = bncore.batch_renorm(x, new_rm, new_rv, w, b, True, 0.1, rmax=2.0, dmax=1.0, axis=axis)
    ey, _, _, r, d = batch_renorm_ref(to_numpy64(x), rm.numpy(), rv.numpy(), to_numpy64(w), to_numpy64(b),
                                      rmax=2.0, dmax=1.0, axis=axis)
    assert ((r > 0.5) & (r < 2.0)).any() and ((r == 2.0) | (r == 0.5) | (np.abs(d) == 1.0)).any()
    assert_close(y, ey, torch.float64)
    xs = to_numpy64(x)
    axes = tuple(i for i in range(xs.ndim) if i != axis % xs.ndim)
    assert_close(new_rm, 0.9 * rm.numpy() + 0.1 * xs.mean(axis=axes), torch.float64)
    assert_close(new_rv, 0.9 * rv.numpy() + 0.1 * xs.var(axis=axes, ddof=1), torch.float64)
    dy = _data(x.shape, seed=4)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = batch_renorm_backward_ref(to_numpy64(dy), xs, r, d, to_numpy64(w), axis=axis)
    for a, e in zip(got, want):
        assert_close(a, e, torch.float64, "grad")


def test_renorm_eval_is_batch_norm_eval_with_gradients():
    x, (w, b) = _data((6, 3, 4)), _params(3)
    rm, rv = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64), torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64)
    ours, theirs = _leaves(x, w, b), _leaves(x, w, b)
    y1 = bncore.batch_renorm(ours[0], rm, rv, ours[1], ours[2], False)
    y2 = F.batch_norm(theirs[0], rm, rv, theirs[1], theirs[2], False)
    assert_close(y1, y2.detach(), torch.float64)
    dy = _data(x.shape, seed=8)
    for a, e in zip(torch.autograd.grad(y1, ours, dy), torch.autograd.grad(y2, theirs, dy)):
        assert_close(a, e, torch.float64, "grad")


def test_ghost_non_multiple_batch_raises_naming_both_numbers_and_changes_nothing():
    x = _data((10, 3, 4)).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="10 samples.*virtual batch size 4"):
        bncore.batch_norm(x, rm, rv, training=True, virtual_batch_size=4)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------- modules


def test_batch_renorm_module_schedule_repr_and_bad_input():
    m = bt.BatchRenorm2d(4)
    assert (m.rmax, m.dmax) == (3.0, 5.0) and "rmax=3.0, dmax=5.0" in repr(m) and "bncore.BatchRenorm2d" in repr(m)
    m.rmax, m.dmax = bncore.renorm_schedule(6000, start=5000, rmax_steps=1000, dmax_steps=2000)
    assert (m.rmax, m.dmax) == (3.0, 2.5)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 3))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="channel"):
        m(torch.randn(2, 5, 3, 3))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    with pytest.raises(bncore.InvalidArgumentError, match="rmax"):
        bt.BatchRenorm1d(3, rmax=0.5)


# ---------------------------------------------------------------- fuse


class _Block(torch.nn.Module):
    """A ResNet basic block, with a chosen spelling of the ReLU after the residual add."""

    def __init__(self, c, spelling):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.spelling = spelling

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(y))
        if self.spelling == "module":
            out += x
            return self.relu(out)
        if self.spelling == "function":
            return F.relu(x + out)
        if self.spelling == "torch":
            return torch.relu(torch.add(out, x))
        return out.add(x).relu()


def _trained_like(model, fused, x, steps=2):
    """Outputs and gradients of both models agree in training (statistics updated alike) and eval."""
    for mode in (True, False):
        model.train(mode)
        fused.train(mode)
        for _ in range(steps if mode else 1):
            a, b = model(x), fused(x)
            assert_close(b, a.detach(), x.dtype)
            ga = torch.autograd.grad(a.square().sum(), [x, *model.parameters()])
            gb = torch.autograd.grad(b.square().sum(), [x, *fused.parameters()])
            for p, q in zip(ga, gb):
                assert_close(q, p, x.dtype, "grad", scale=4.0)
    buffers = dict(model.named_buffers())
    for name, buf in fused.named_buffers():
        assert torch.equal(buf, buffers[name]) if buf.dtype == torch.int64 else True
        assert_close(buf, buffers[name], torch.float32)


@pytest.mark.parametrize("spelling", ["module", "function", "torch", "method"])
def test_fuse_residual_blocks_by_tracing(spelling):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                _Block(8, spelling))
    fused, report = bt.fuse(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule)
    assert [name for name, _, _ in report.replaced] == ["1", "3.bn1", "3.bn2"] and not report.skipped
    assert "add + ReLU" in report.replaced[2][1] and str(report).startswith("bncore.torch.fuse: 3 replaced")
    assert sum(isinstance(m, bt.BatchNormReLU2d) for m in fused.modules()) == 3
    assert not any(type(m) is torch.nn.BatchNorm2d for m in fused.modules())
    assert all(type(m) is torch.nn.BatchNorm2d for m in (model[1], model[3].bn1, model[3].bn2))  # model as it was
    _trained_like(model, fused, torch.randn(4, 3, 10, 10, requires_grad=True))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fuse_sequential_of_each_rank_with_bncore_and_torch_batch_norms(dims):
    shape = SHAPES[dims]
    bn_torch = getattr(torch.nn, f"BatchNorm{dims}d")(3)
    bn_ours = getattr(bt, f"BatchNorm{dims}d")(3)
    model = torch.nn.Sequential(bn_torch, torch.nn.ReLU(), torch.nn.Identity(), bn_ours, torch.nn.ReLU(inplace=True))
    fused, report = bt.fuse(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule)  # bncore's modules are leaves of the trace, as torch.nn's
    assert len(report.replaced) == 2
    assert sum(type(m).__name__ == f"BatchNormReLU{dims}d" for m in fused.modules()) == 2
    _trained_like(model, fused, torch.randn(*shape, requires_grad=True))


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so fuse looks in its Sequentials."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.tail = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Sigmoid())

    def forward(self, x):
        y = self.body(x)
        return self.tail(y) if float(y.detach().sum()) > -1e9 else y


def test_fuse_untraceable_model_in_its_sequentials():
    model = _Untraceable()
    fused, report = bt.fuse(model, report=True)
    assert not isinstance(fused, torch.fx.GraphModule)
    assert isinstance(fused.body[1], bt.BatchNormReLU2d) and isinstance(fused.body[2], torch.nn.Identity)
    assert [name for name, _, _ in report.skipped] == ["tail.0"] and "nn.ReLU" in report.skipped[0][2]
    _trained_like(model, fused, torch.randn(2, 3, 5, 5, requires_grad=True))


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)
        self.renorm = bt.BatchRenorm1d(4)

    def forward(self, x):
        y = self.bn(x)
        z = self.renorm(x)
        return torch.relu(y) + y + torch.relu(z)  # bn's output is also read unrectified


def test_fuse_leaves_a_batch_norm_whose_output_is_read_elsewhere_and_renorm():
    model = _Shared()
    fused, report = bt.fuse(model, report=True)
    assert not report.replaced
    reasons = {name: why for name, _, why in report.skipped}
    assert "read by 2 operations" in reasons["bn"] and "renormalization" in reasons["renorm"]
    _trained_like(model, fused, torch.randn(6, 4, requires_grad=True))


def test_fused_module_with_a_broadcast_residual_adds_it_unfused():
    m = bt.BatchNormReLU2d(3)
    x, res = torch.randn(4, 3, 2, 2), torch.randn(3, 1, 1)
    ref = torch.nn.BatchNorm2d(3)
    assert_close(m(x, res), torch.relu(ref(x) + res).detach(), torch.float32)
    assert_close(m.running_var, ref.running_var, torch.float32)


def test_fuse_refuses_what_is_no_module():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        bt.fuse(lambda x: x)


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph_with_renorm_ghost_and_fused_modules_has_no_graph_break():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), bt.BatchRenorm2d(4, rmax=2.0, dmax=1.0),
                                torch.nn.ReLU(), bt.BatchNorm2d(4, virtual_batch_size=2), torch.nn.ReLU())
    model = bt.fuse(model)
    assert any(isinstance(m, bt.BatchNormReLU2d) for m in model.modules())
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    assert sum(op.startswith("bncore.batch_renorm") for op in ops) == 1, ops
    assert sum(op.startswith("bncore.batch_norm") for op in ops) == 1, ops  # ghost batch norm fused with its ReLU
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        a, b = eager(x), compiled(x)
        assert_close(b, a.detach(), torch.float32)
        ga = torch.autograd.grad(a.sum(), list(eager.parameters()))
        gb = torch.autograd.grad(b.sum(), list(model.parameters()))
        for p, q in zip(ga, gb):
            assert_close(q, p, torch.float32, "grad")
    for (name, e), (_, c) in zip(eager.named_buffers(), model.named_buffers()):
        assert torch.equal(e, c), name
