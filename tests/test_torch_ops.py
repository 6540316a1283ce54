"""bncore's PyTorch custom operators (``torch.ops.bncore.*``, bncore._torch_ops): opcheck for every
op, gradients against torch's own ops (float64), gradcheck, and the tools that need one opaque op:
torch.compile (fullgraph, no graph break), torch.export, torch.func (vmap, grad, functional_call),
torch.jit.trace, meta tensors; torch.jit.script is refused with a message that says what works."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import bncore  # noqa: E402
import bncore.torch as bt  # noqa: E402
from bncore import _torch_ops as ops  # noqa: E402
from bncore import functional  # noqa: E402

D = torch.float64


def rand(*shape, seed=0, dtype=D, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


# ---------------------------------------------------------------- opcheck, for every op


def _op_samples():
    x4, c = rand(4, 3, 5, 6, seed=1), 3
    w, b = rand(c, seed=2) + 1, rand(c, seed=3)
    rm, rv = rand(c, seed=4), rand(c, seed=5).abs() + 0.5
    x3 = rand(4, 6, 8, seed=6)
    wl, bl = rand(8, seed=7), rand(8, seed=8)
    dy4, dy3 = rand(4, 3, 5, 6, seed=9), rand(4, 6, 8, seed=10)
    _, m4, r4, _, _ = ops._batch_norm_op(x4, w, b, None, None, True, 0.1, 1e-5, 1)
    _, mi, ri, _, _ = ops._instance_norm_op(x4, w, b, None, None, True, 0.1, 1e-5)
    _, ml, rl = ops._layer_norm_op(x3, [8], wl, bl, 1e-5)
    wg = rand(6, seed=11)
    _, mg, rg = ops._group_norm_op(x3, 2, wg, None, 1e-5)
    _, rr = ops._rms_norm_op(x3, [8], wl, None)
    _, mn, rn = ops._normalize_op(x4, [0, 2, 3], w, b, [1], 1e-5, False)
    res = rand(4, 3, 5, 6, seed=12)
    yf, mf, rf, _, _ = ops._batch_norm_op(x4, w, b, None, None, True, 0.1, 1e-5, 1, 2, "relu", res)
    _, mq, rq, r, d, _, _ = ops._batch_renorm_op(x4, w, b, rm, rv, True, 0.1, 1e-5, 1.5, 0.5, 1)
    return [
        ("batch_ghost_fused_residual", ops._batch_norm_op, (x4, w, b, rm, rv, True, 0.1, 1e-5, 1, 2, "relu", res)),
        ("batch_fused_eval", ops._batch_norm_op, (x4, w, b, rm, rv, False, 0.1, 1e-5, 1, 0, "relu", None)),
        ("batch_ghost_fused_backward", ops._batch_norm_backward_op, (dy4, x4, w, mf, rf, True, 1, 2, yf, True)),
        ("renorm_train", ops._batch_renorm_op, (x4, w, b, rm, rv, True, 0.1, 1e-5, 1.5, 0.5, 1)),
        ("renorm_eval", ops._batch_renorm_op, (x4, w, b, rm, rv, False, 0.1, 1e-5, 1.5, 0.5, 1)),
        ("renorm_backward", ops._batch_renorm_backward_op, (dy4, x4, w, mq, rq, r, d, True, 1)),
        ("batch_train_running", ops._batch_norm_op, (x4, w, b, rm, rv, True, 0.1, 1e-5, 1)),
        ("batch_train_no_running", ops._batch_norm_op, (x4, None, b, None, None, True, 0.1, 1e-5, 1)),
        ("batch_eval", ops._batch_norm_op, (x4, w, b, rm, rv, False, 0.1, 1e-5, 1)),
        ("batch_channels_last_axis", ops._batch_norm_op, (x4.permute(0, 2, 3, 1), w, b, None, None, True, 0.1, 1e-5,
                                                          -1)),
        ("batch_backward", ops._batch_norm_backward_op, (dy4, x4, w, m4, r4, True, 1)),
        ("instance_running", ops._instance_norm_op, (x4, w, b, rm, rv, True, 0.1, 1e-5)),
        ("instance_backward", ops._instance_norm_backward_op, (dy4, x4, w, mi, ri, True)),
        ("layer", ops._layer_norm_op, (x3, [8], wl, bl, 1e-5)),
        ("layer_backward", ops._layer_norm_backward_op, (dy3, x3, [8], wl, ml, rl)),
        ("group", ops._group_norm_op, (x3, 2, wg, None, 1e-5)),
        ("group_backward", ops._group_norm_backward_op, (dy3, x3, 2, wg, mg, rg)),
        ("rms", ops._rms_norm_op, (x3, [8], wl, None)),
        ("rms_backward", ops._rms_norm_backward_op, (dy3, x3, [8], wl, rr)),
        ("normalize", ops._normalize_op, (x4, [0, 2, 3], w, b, [1], 1e-5, False)),
        ("normalize_backward", ops._normalize_backward_op, (dy4, x4, [0, 2, 3], w, mn, rn, [1], False)),
    ]


@pytest.mark.parametrize("name, op, args", _op_samples(), ids=[s[0] for s in _op_samples()])
def test_opcheck(name, op, args):
    args = tuple(a.clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    if "backward" not in name:  # the forward ops are differentiable in input, weight and bias
        args = (args[0].clone().requires_grad_(True), *args[1:])
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name, op, args", _op_samples(), ids=[s[0] for s in _op_samples()])
def test_every_op_lets_inductor_keep_its_layouts_and_the_fake_kernel_says_the_strides(name, op, args):
    """Each op is tagged flexible_layout (inductor hands it channels-last convolution outputs as they
    are, instead of copying them to the traced strides and back): so the fake kernel must give the
    real kernel's strides for an input of another layout too, here a transposed one."""
    assert torch.Tag.flexible_layout in op._opoverload.tags
    from torch._subclasses.fake_tensor import FakeTensorMode

    moved = tuple(a.transpose(0, -1).contiguous().transpose(0, -1) if isinstance(a, torch.Tensor) and a.dim() > 2
                  else a for a in args)
    real = op(*moved)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in moved))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


# ---------------------------------------------------------------- the functional API is differentiable


_FUNCTIONAL = {
    "batch_norm": (lambda x, w, b: bncore.batch_norm(x, None, None, w, b, True),
                   lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), (4, 3, 5, 2), 3),
    "batch_norm_eval": (lambda x, w, b: bncore.batch_norm(x, _RM, _RV, w, b, False),
                        lambda x, w, b: TF.batch_norm(x, _RM, _RV, w, b, False), (4, 3, 5, 2), 3),
    "instance_norm": (lambda x, w, b: bncore.instance_norm(x, None, None, w, b),
                      lambda x, w, b: TF.instance_norm(x, None, None, w, b), (4, 3, 5, 2), 3),
    "layer_norm": (lambda x, w, b: bncore.layer_norm(x, (5, 2), w, b),
                   lambda x, w, b: TF.layer_norm(x, (5, 2), w, b), (4, 3, 5, 2), (5, 2)),
    "group_norm": (lambda x, w, b: bncore.group_norm(x, 2, w, b),
                   lambda x, w, b: TF.group_norm(x, 2, w, b), (4, 6, 5), 6),
    "rms_norm": (lambda x, w, b: bncore.rms_norm(x, (5,), w) + b,
                 lambda x, w, b: TF.rms_norm(x, (5,), w) + b, (4, 3, 5), 5),
    "normalize_as_layer_norm": (lambda x, w, b: bncore.normalize(x, (-1,), w, b),
                                lambda x, w, b: TF.layer_norm(x, (5,), w, b), (4, 3, 5), 5),
}
_RM, _RV = rand(3, seed=20), rand(3, seed=21).abs() + 0.5


@pytest.mark.parametrize("name", list(_FUNCTIONAL))
def test_functional_gradients_match_torch_ops(name):
    ours, theirs, shape, pshape = _FUNCTIONAL[name]
    pshape = pshape if isinstance(pshape, tuple) else (pshape,)
    x, w, b = rand(*shape, seed=1, grad=True), rand(*pshape, seed=2, grad=True), rand(*pshape, seed=3, grad=True)
    dy = rand(*shape, seed=4)
    y_ours = ours(x, w, b)
    y_ref = theirs(x, w, b)
    assert y_ours.requires_grad
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(y_ours, (x, w, b), dy)
    g_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for got, want, what in zip(g_ours, g_ref, ("input", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"{name}: grad {what}")


@pytest.mark.parametrize("name", list(_FUNCTIONAL))
def test_functional_gradcheck(name):
    ours, _, shape, pshape = _FUNCTIONAL[name]
    pshape = pshape if isinstance(pshape, tuple) else (pshape,)
    args = (rand(*shape, seed=1, grad=True), rand(*pshape, seed=2, grad=True), rand(*pshape, seed=3, grad=True))
    assert torch.autograd.gradcheck(ours, args)


def test_functional_without_grad_mode_records_nothing_and_gives_the_same_bits():
    x, w = rand(4, 3, 5, seed=1, grad=True), rand(3, seed=2, grad=True)
    y = bncore.batch_norm(x, None, None, w, None, True)
    with torch.no_grad():
        y_plain = bncore.batch_norm(x, None, None, w, None, True)
    assert y.grad_fn is not None and y_plain.grad_fn is None
    assert torch.equal(y.detach(), y_plain)


def test_functional_running_stats_through_the_op_match_torch():
    x = rand(6, 3, 4, seed=1, grad=True)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    rm_t, rv_t = rm.clone(), rv.clone()
    version = rm._version
    bncore.batch_norm(x, rm, rv, None, None, True, 0.3)
    TF.batch_norm(x, rm_t, rv_t, None, None, True, 0.3)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    assert rm._version > version  # autograd sees the write


def test_functional_bad_scalar_through_the_op_names_it_and_changes_nothing():
    x = rand(6, 3, 4, seed=1, grad=True)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(ValueError, match="momentum"):
        bncore.batch_norm(x, rm, rv, None, None, True, 1.5)
    with pytest.raises(ValueError, match="eps"):
        bncore.layer_norm(x, (4,), eps=-1.0)
    with pytest.raises(TypeError, match="momentum"):
        bncore.batch_norm(x, rm, rv, None, None, True, None)
    assert torch.equal(rm, torch.zeros(3, dtype=D)) and torch.equal(rv, torch.ones(3, dtype=D))


@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_any_one_tensor_that_requires_grad_takes_the_op(which):
    # the plain path records no gradient: a call with only one tensor requiring grad must still find it
    args = {"input": rand(4, 3, 5, seed=1), "weight": rand(3, seed=2), "bias": rand(3, seed=3)}
    args[which].requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    y = bncore.batch_norm(args["input"], rm, rv, args["weight"], args["bias"], True)
    assert y.grad_fn is not None, which
    g = torch.autograd.grad(y.sum() + (y * y).sum(), args[which])[0]
    x, w, b = (t.detach().requires_grad_(k == which) for k, t in args.items())
    y_ref = TF.batch_norm(x, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), w, b, True)
    g_ref = torch.autograd.grad(y_ref.sum() + (y_ref * y_ref).sum(), (x, w, b)[list(args).index(which)])[0]
    torch.testing.assert_close(g, g_ref)


def test_needs_op_reads_only_tensors():
    x = rand(4, 3, seed=1)
    assert not ops.needs_op(x, None, x.numpy(), 1.5)
    assert ops.needs_op(x, None, rand(3, seed=2, grad=True))
    with torch.no_grad():
        assert not ops.needs_op(x, rand(3, seed=2, grad=True))


def test_bias_without_weight_through_the_op():
    x, b = rand(4, 3, 5, seed=1, grad=True), rand(3, seed=2, grad=True)
    g = torch.autograd.grad(bncore.batch_norm(x, None, None, None, b, True).sum(), b)[0]
    g_ref = torch.autograd.grad(TF.batch_norm(x, None, None, None, b, True).sum(), b)[0]
    torch.testing.assert_close(g, g_ref)


def test_double_backward_is_refused():
    x = rand(4, 3, 5, seed=1, grad=True)
    (gx,) = torch.autograd.grad(bncore.layer_norm(x, (5,)).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd|backward"):
        gx.sum().backward()


# ---------------------------------------------------------------- models: compile, export, jit, func, meta


class Every(torch.nn.Module):
    """Each variant once, converted."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.ln = torch.nn.LayerNorm(6)
        self.rms = torch.nn.RMSNorm(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.rms(self.ln(self.inorm(self.gn(y))))


def every(seed=0):
    torch.manual_seed(seed)
    return Every()


def _step(model, x):
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_step(a, b, state_a, state_b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)
    for name, value in state_a.items():
        torch.testing.assert_close(value, state_b[name], rtol=tol, atol=tol, msg=name)


def test_compile_fullgraph_aot_eager_has_no_graph_break_and_trains_like_eager():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eager = bt.convert(every())
    compiled = copy.deepcopy(eager)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)  # it runs the model: a copy's statistics move
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the running statistics move twice, as eager
        expected, got = _step(eager, x), _step(fn, x)
        _assert_same_step(got, expected, compiled.state_dict(), eager.state_dict())
    assert int(compiled.bn.num_batches_tracked) == 2


def test_compile_functional_call_fullgraph():
    def f(x, w, b):
        return bncore.layer_norm(x, (5,), w, b).sum() + bncore.batch_norm(x, None, None, None, None, True).sum()

    x, w, b = rand(3, 4, 5, grad=True), rand(5, seed=1, grad=True), rand(5, seed=2, grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(f(x, w, b), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_compile_inductor_fullgraph_trains_like_eager():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eager = bt.convert(every())
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, fullgraph=True, backend="inductor")
    for _ in range(2):
        expected, got = _step(eager, x), _step(fn, x)
        _assert_same_step(got, expected, compiled.state_dict(), eager.state_dict(), tol=1e-4)
    compiled.eval()
    eager.eval()
    torch.testing.assert_close(fn(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_runs_like_eager(training):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = bt.convert(every()).train(training)
    reference = copy.deepcopy(model)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bncore.batch_norm.default", "bncore.group_norm.default", "bncore.layer_norm.default",
            "bncore.rms_norm.default", "bncore.instance_norm.default"} <= targets
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x))
    for name, value in reference.state_dict().items():  # the running statistics moved as eager's
        torch.testing.assert_close(exported.state_dict()[name], value, msg=name)
    decomposed = program.run_decompositions()  # functionalized: the buffers' writes are outputs, as torch's own
    mutated = set(decomposed.graph_signature.buffers_to_mutate.values())
    running = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "inorm.running_mean",
               "inorm.running_var"}
    assert mutated == (running if training else set())
    assert decomposed.module()(x).shape == (2, 8, 6, 6)


def test_vmap_per_sample_gradients_match_a_loop():
    layer = bt.convert(torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 1)))
    bn = bt.BatchNorm1d(6).eval()
    bn.running_mean.normal_()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(2))

    def loss(p, x):
        return bn(functional_call(layer, p, (x,)).expand(3, 6)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        one = grad(loss)(params, xs[i])
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        eager = dict(zip(p, torch.autograd.grad(loss(p, xs[i]), list(p.values()))))
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name], msg=name)
            torch.testing.assert_close(one[name], eager[name], msg=name)


def test_vmap_of_batch_norm_training_matches_each_slice():
    xs = rand(5, 4, 3, 6, seed=3)
    ys = vmap(lambda x: bncore.batch_norm(x, None, None, None, None, True))(xs)
    for i in range(xs.shape[0]):
        torch.testing.assert_close(ys[i], TF.batch_norm(xs[i], None, None, None, None, True))


def test_vmap_refuses_one_running_buffer_for_many_samples():
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(lambda x: bncore.batch_norm(x, rm, rv, None, None, True))(rand(5, 4, 3, seed=3))
    assert torch.equal(rm, torch.zeros(3, dtype=D))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated; it must still work
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace_records_the_ops(training):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = bt.convert(every()).train(training)
    reference = copy.deepcopy(model)
    traced = torch.jit.trace(model, x, check_trace=False)
    assert "bncore::batch_norm" in str(traced.inlined_graph) and "bncore::rms_norm" in str(traced.inlined_graph)
    y = traced(rand(2, 3, 8, 8, seed=5, dtype=torch.float32))  # another input: not a constant
    torch.testing.assert_close(y, reference(rand(2, 3, 8, 8, seed=5, dtype=torch.float32)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_is_refused_with_what_to_use():
    with pytest.raises(TypeError, match="torch.compile"):
        torch.jit.script(bt.convert(every()))


def test_meta_model_gives_meta_outputs_and_shapes():
    with torch.device("meta"):
        model = bt.convert(every())
        x = torch.empty(2, 3, 8, 8)
    y = model(x)
    assert y.device.type == "meta" and y.shape == (2, 8, 6, 6)
    y.sum().backward()
    assert model.bn.weight.grad.device.type == "meta"


def test_meta_input_with_cpu_parameters_names_the_argument():
    with pytest.raises(bncore.UnsupportedDeviceError, match="weight"):
        bt.BatchNorm2d(3)(torch.empty(2, 3, 4, 4, device="meta"))


def test_fake_tensor_shapes_and_strides_match_the_real_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
    real = ops._batch_norm_op(x, None, None, None, None, True, 0.1, 1e-5, 1)
    with FakeTensorMode() as mode:
        fake = ops._batch_norm_op(mode.from_tensor(x), None, None, None, None, True, 0.1, 1e-5, 1)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


@pytest.mark.parametrize("shape, layout, dtype", [
    ((8, 16, 4, 4), torch.contiguous_format, torch.float32), ((8, 16, 4, 4), torch.channels_last, torch.float32),
    ((5, 3), torch.contiguous_format, torch.float64), ((4, 6, 7), torch.contiguous_format, torch.bfloat16)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_kernels_one_call_path_gives_the_checked_paths_bits(shape, layout, dtype, training, monkeypatch):
    """The ops' kernels try one C call (the checks validated once per key) before the checked path:
    it is taken for these common calls and gives the checked path's outputs bit for bit, strides and
    dtypes included, and the same running statistics; the backward too, with an expanded grad_output
    (what .sum().backward() passes) and a dense one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    c = shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    rm_fast, rv_fast, rm_checked, rv_checked = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    fast = ops._batch_forward_one_call(x, w, b, rm_fast, rv_fast, training, 0.1, 1e-5, 1)
    checked = bncore.batch_norm_forward(x, rm_checked, rv_checked, w, b, training, 0.1, 1e-5)
    assert fast is not None
    for got, want in zip((*fast, rm_fast, rv_fast), (*checked, rm_checked, rv_checked)):
        assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype
    for dy in (torch.ones((), dtype=dtype).expand(shape), torch.randn(shape, generator=gen).to(dtype)):
        fast_grads = functional._batch_norm_backward_small(dy, x, w, fast[1], fast[2], training, 1)
        with monkeypatch.context() as m:  # the checked path alone
            m.setattr(functional, "_batch_norm_backward_small", lambda *a, **k: None)
            want_grads = bncore.batch_norm_backward(dy, x, w, fast[1], fast[2], training=training)
        assert fast_grads is not None
        for got, want in zip(fast_grads, want_grads):
            assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype


@pytest.mark.parametrize("call, error, name", [
    (lambda x, rm, rv: bncore.batch_norm(x, rm, rv, torch.ones(4, dtype=D), None, True), bncore.ShapeMismatchError,
     "weight"),
    (lambda x, rm, rv: bncore.batch_norm(x, rm, torch.ones(5, dtype=D), None, None, True), bncore.ShapeMismatchError,
     "running_var"),
    (lambda x, rm, rv: bncore.batch_norm(x.to(torch.float16), rm, rv, None, None, True, 0.1, 1e-5, axis=7),
     bncore.InvalidArgumentError, "axis"),
    (lambda x, rm, rv: bncore.group_norm(x, 2), bncore.ShapeMismatchError, "num_groups"),
    (lambda x, rm, rv: bncore.layer_norm(x, (5,)), bncore.ShapeMismatchError, "normalized_shape"),
])
def test_bad_calls_through_the_op_raise_bncore_errors_and_change_nothing(call, error, name):
    x = rand(6, 3, 4, seed=1, grad=True)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(error, match=name):
        call(x, rm, rv)
    assert torch.equal(rm, torch.zeros(3, dtype=D)) and torch.equal(rv, torch.ones(3, dtype=D))
