"""bncore.torch's BatchRenorm1d/2d/3d and ghost BatchNorm1d/2d/3d (virtual_batch_size): against the
float64 references of bncore.reference, gradcheck in float64, their equivalences with batch norm, and
bad input that raises a clear error and leaves the running statistics as they were."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.func import functional_call  # noqa: E402

import bncore  # noqa: E402
import bncore.torch as bt  # noqa: E402
from bncore.reference import (batch_norm_running_ref, batch_renorm_backward_ref, batch_renorm_ref,  # noqa: E402
                              ghost_batch_norm_backward_ref, ghost_batch_norm_ref, ghost_running_ref)
from tolerances import assert_close  # noqa: E402

D = torch.float64
RENORMS = {1: bt.BatchRenorm1d, 2: bt.BatchRenorm2d, 3: bt.BatchRenorm3d}
GHOSTS = {1: bt.BatchNorm1d, 2: bt.BatchNorm2d, 3: bt.BatchNorm3d}
TORCH_BNS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
SHAPES = {1: (8, 3, 5), 2: (8, 3, 4, 5), 3: (4, 3, 2, 3, 4)}


def rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with_stats(module, seed, scale=1.0):
    """Parameters and running statistics away from their defaults (some r and d clipped, some not)."""
    c = module.num_features
    with torch.no_grad():
        module.weight.copy_(rand(c, seed=seed) * 0.3 + 1)
        module.bias.copy_(rand(c, seed=seed + 1))
        module.running_mean.copy_(rand(c, seed=seed + 2) * scale)
        module.running_var.copy_(rand(c, seed=seed + 3).abs() * scale + 0.2)
    return module


def _np(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------- batch renormalization


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_module_matches_the_reference_forward_backward_and_running_stats(dims, dtype):
    m = _with_stats(RENORMS[dims](3, momentum=0.3, rmax=1.5, dmax=0.4).to(dtype), seed=1, scale=1.5)
    x = rand(*SHAPES[dims], seed=5, dtype=dtype).requires_grad_()
    dy = rand(*SHAPES[dims], seed=6, dtype=dtype)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    y.backward(dy)
    y_ref, _, _, r, d = batch_renorm_ref(_np(x), _np(rm0), _np(rv0), _np(m.weight), _np(m.bias), m.eps, 1.5, 0.4)
    clipped = (abs(r - 1.5) < 1e-12).sum() + (abs(r - 1 / 1.5) < 1e-12).sum() + (abs(abs(d) - 0.4) < 1e-12).sum()
    assert clipped > 0  # the data reach the clipping, not only the linear part
    assert_close(y, y_ref, dtype, err_msg="y")
    dx, dw, db = batch_renorm_backward_ref(_np(dy), _np(x), r, d, _np(m.weight), m.eps)
    assert_close(x.grad, dx, dtype, "grad", err_msg="grad_input")
    assert_close(m.weight.grad, dw, dtype, "grad", err_msg="grad_weight")
    assert_close(m.bias.grad, db, dtype, "grad", err_msg="grad_bias")
    rm_ref, rv_ref = batch_norm_running_ref(_np(x), _np(rm0), _np(rv0), 0.3)
    assert_close(m.running_mean, rm_ref, dtype, err_msg="running_mean")
    assert_close(m.running_var, rv_ref, dtype, err_msg="running_var")
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_module_gradcheck(dims):
    """Running statistics far from the batch's clip r to 1/rmax and d to dmax: there r and d are truly
    constant, so finite differences see exactly the gradient the paper prescribes."""
    m = RENORMS[dims](3, rmax=2.0, dmax=1.0).double()
    x = rand(*SHAPES[dims], seed=7).requires_grad_()
    w, b = (rand(3, seed=8) + 2).requires_grad_(), rand(3, seed=9).requires_grad_()

    def run(x, w, b):
        return functional_call(m, {"weight": w, "bias": b, "running_mean": torch.full((3,), -40.0, dtype=D),
                                   "running_var": torch.full((3,), 90.0, dtype=D)}, (x,))

    assert torch.autograd.gradcheck(run, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_with_rmax_1_dmax_0_is_batch_norm(dims, training):
    renorm = _with_stats(RENORMS[dims](3, rmax=1.0, dmax=0.0).double(), seed=2).train(training)
    torch_bn = _with_stats(TORCH_BNS[dims](3).double(), seed=2).train(training)
    x = rand(*SHAPES[dims], seed=3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = renorm(xa), torch_bn(xb)
    dy = rand(*SHAPES[dims], seed=4)
    ga = torch.autograd.grad(ya, (xa, renorm.weight, renorm.bias), dy)
    gb = torch.autograd.grad(yb, (xb, torch_bn.weight, torch_bn.bias), dy)
    assert_close(ya, yb.detach(), D, err_msg="y")
    for name, a, b in zip(("input", "weight", "bias"), ga, gb):
        assert_close(a, b, D, "grad", err_msg=f"grad_{name}")
    assert_close(renorm.running_mean, torch_bn.running_mean, D, err_msg="running_mean")
    assert_close(renorm.running_var, torch_bn.running_var, D, err_msg="running_var")


def test_renorm_schedule_drives_the_module_bounds():
    """Step 0 of the warm-up is plain batch norm; a later step's bounds are the module's attributes."""
    m = _with_stats(bt.BatchRenorm2d(3).double(), seed=3, scale=2.0)
    x = rand(*SHAPES[2], seed=4)
    for step in (0, 30000):
        m.rmax, m.dmax = bncore.renorm_schedule(step)
        rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
        y = m(x)
        expected = batch_renorm_ref(_np(x), _np(rm0), _np(rv0), _np(m.weight), _np(m.bias), m.eps, m.rmax, m.dmax)[0]
        assert_close(y, expected, D, err_msg=f"step {step}")
    assert (m.rmax, m.dmax) == bncore.renorm_schedule(30000) and m.rmax > 1.0


def test_renorm_eval_is_batch_norm_eval():
    m = _with_stats(bt.BatchRenorm2d(3).double(), seed=5).eval()
    ref = _with_stats(torch.nn.BatchNorm2d(3).double(), seed=5).eval()
    x = rand(*SHAPES[2], seed=6)
    assert_close(m(x), ref(x).detach(), D)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_wrong_dims_raise_and_change_nothing(dims):
    m = _with_stats(RENORMS[dims](3), seed=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="expected .*D input"):
        m(torch.randn(*(2,) * (dims + 3)))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_renorm_bad_bounds_name_the_argument():
    with pytest.raises(ValueError, match="rmax: expected a value >= 1"):
        bt.BatchRenorm2d(3, rmax=0.5)
    m = bt.BatchRenorm2d(3)
    m.dmax = -1.0
    before = m.running_mean.clone()
    with pytest.raises(ValueError, match="dmax: expected a value >= 0"):
        m(torch.randn(4, 3, 2, 2))
    assert torch.equal(m.running_mean, before) and int(m.num_batches_tracked) == 0


# ---------------------------------------------------------------- ghost batch norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ghost_module_matches_the_reference_and_its_running_stat_rule(dims, dtype):
    m = _with_stats(GHOSTS[dims](3, momentum=0.2, virtual_batch_size=2).to(dtype), seed=4)
    x = rand(*SHAPES[dims], seed=5, dtype=dtype).requires_grad_()
    dy = rand(*SHAPES[dims], seed=6, dtype=dtype)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    y.backward(dy)
    w, b = _np(m.weight), _np(m.bias)
    assert_close(y, ghost_batch_norm_ref(_np(x), 2, w, b, m.eps)[0], dtype, err_msg="y")
    dx, dw, db = ghost_batch_norm_backward_ref(_np(dy), _np(x), 2, w, m.eps)
    assert_close(x.grad, dx, dtype, "grad", err_msg="grad_input")
    assert_close(m.weight.grad, dw, dtype, "grad", err_msg="grad_weight")
    assert_close(m.bias.grad, db, dtype, "grad", err_msg="grad_bias")
    rm_ref, rv_ref = ghost_running_ref(_np(x), 2, _np(rm0), _np(rv0), 0.2)
    assert_close(m.running_mean, rm_ref, dtype, err_msg="running_mean")
    assert_close(m.running_var, rv_ref, dtype, err_msg="running_var")


def test_ghost_equals_per_chunk_torch_batch_norm_concatenated():
    """Outputs and gradients are those of torch's BatchNorm2d on each chunk; the running statistics
    follow docs/ghost_batch_norm.md: the chunks' mean statistics folded in once."""
    v = 2
    ghost = _with_stats(bt.BatchNorm2d(3, momentum=0.25, virtual_batch_size=v).double(), seed=7)
    chunk_bns = [_with_stats(torch.nn.BatchNorm2d(3, momentum=1.0).double(), seed=7) for _ in range(4)]
    x = rand(*SHAPES[2], seed=8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    rm0, rv0 = ghost.running_mean.clone(), ghost.running_var.clone()
    ya = ghost(xa)
    yb = torch.cat([bn(xb[i * v:(i + 1) * v]) for i, bn in enumerate(chunk_bns)])
    dy = rand(*SHAPES[2], seed=9)
    (dxa,) = torch.autograd.grad(ya, xa, dy)
    (dxb,) = torch.autograd.grad(yb, xb, dy)
    assert_close(ya, yb.detach(), D, err_msg="y")
    assert_close(dxa, dxb, D, "grad", err_msg="grad_input")
    # momentum 1 leaves each chunk's own statistics in its module: their mean, folded in with 0.25
    mean = torch.stack([bn.running_mean for bn in chunk_bns]).mean(0)
    var = torch.stack([bn.running_var for bn in chunk_bns]).mean(0)
    assert_close(ghost.running_mean, 0.75 * rm0 + 0.25 * mean, D, err_msg="running_mean")
    assert_close(ghost.running_var, 0.75 * rv0 + 0.25 * var, D, err_msg="running_var")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ghost_module_gradcheck(dims):
    m = GHOSTS[dims](3, virtual_batch_size=2).double()
    x = rand(*SHAPES[dims], seed=10).requires_grad_()
    w, b = (rand(3, seed=11) + 2).requires_grad_(), rand(3, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: functional_call(m, {"weight": w, "bias": b}, (x,)), (x, w, b))


def test_ghost_eval_ignores_the_virtual_batches():
    ghost = _with_stats(bt.BatchNorm2d(3, virtual_batch_size=3).double(), seed=1).eval()
    plain = _with_stats(torch.nn.BatchNorm2d(3).double(), seed=1).eval()
    x = rand(8, 3, 2, 2, seed=2)  # 8 is no multiple of 3: eval does not care
    assert_close(ghost(x), plain(x).detach(), D)


def test_ghost_non_multiple_batch_names_both_numbers_and_changes_nothing():
    m = _with_stats(bt.BatchNorm2d(3, virtual_batch_size=3), seed=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"batch of 8 samples .* virtual batch size 3"):
        m(torch.randn(8, 3, 2, 2, requires_grad=True))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ghost_bad_virtual_batch_size_names_it():
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match=f"virtual_batch_size: expected None or a positive int, got {bad!r}"):
            bt.BatchNorm1d(3, virtual_batch_size=bad)


def test_ghost_repr_and_state_dict_keys_are_batch_norms():
    m = bt.BatchNorm2d(3, virtual_batch_size=4)
    assert "virtual_batch_size=4" in repr(m)
    assert set(m.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict())
