"""bncore.torch: torch.nn normalization modules computed by bncore, and `convert`.

Each bncore module is run side by side with its torch.nn original over several
steps (forward, backward, running statistics, state_dict), checked with
torch.autograd.gradcheck in float64, and `convert` is checked on a small CNN
trained for 20 SGD steps next to a deep copy of itself.
"""
from __future__ import annotations

import copy
import io
import re
import subprocess
import sys

import pytest

from tolerances import Tol, assert_close

torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch adapter")
import bncore.functional  # noqa: E402
import bncore.torch as bt  # noqa: E402  (after the skip: importing it imports torch)


def untracked(module):
    module.track_running_stats = False
    return module


# name -> (module factory taking a namespace, torch.nn or bncore.torch; input shape)
LAYERS = {
    "BatchNorm1d-2d": (lambda nn: nn.BatchNorm1d(5), (16, 5)),
    "BatchNorm1d-3d-cumulative": (lambda nn: nn.BatchNorm1d(4, momentum=None), (6, 4, 7)),
    "BatchNorm2d": (lambda nn: nn.BatchNorm2d(3), (4, 3, 5, 6)),
    "BatchNorm2d-no-affine": (lambda nn: nn.BatchNorm2d(3, affine=False), (4, 3, 5, 6)),
    "BatchNorm2d-no-bias": (lambda nn: nn.BatchNorm2d(3, bias=False), (4, 3, 5, 6)),
    "BatchNorm2d-untracked": (lambda nn: nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 5, 6)),
    # running statistics kept, but no longer tracked: training uses batch statistics, eval the buffers
    "BatchNorm2d-tracking-switched-off": (lambda nn: untracked(nn.BatchNorm2d(3)), (4, 3, 5, 6)),
    "BatchNorm3d": (lambda nn: nn.BatchNorm3d(3, momentum=0.3), (2, 3, 3, 4, 5)),
    "InstanceNorm1d-tracked": (lambda nn: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 9)),
    "InstanceNorm1d-unbatched": (lambda nn: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (4, 9)),
    "InstanceNorm2d": (lambda nn: nn.InstanceNorm2d(3, affine=True), (2, 3, 5, 6)),
    "InstanceNorm2d-plain": (lambda nn: nn.InstanceNorm2d(3), (2, 3, 5, 6)),
    "InstanceNorm3d-tracked-cumulative": (
        lambda nn: nn.InstanceNorm3d(2, affine=True, track_running_stats=True, momentum=None), (2, 2, 3, 4, 5)),
    "LayerNorm": (lambda nn: nn.LayerNorm(7), (4, 5, 7)),
    "LayerNorm-2dims": (lambda nn: nn.LayerNorm((5, 7)), (3, 5, 7)),
    "LayerNorm-no-bias": (lambda nn: nn.LayerNorm(7, bias=False), (4, 5, 7)),
    "LayerNorm-no-affine": (lambda nn: nn.LayerNorm(7, elementwise_affine=False), (4, 5, 7)),
    "GroupNorm": (lambda nn: nn.GroupNorm(2, 6), (3, 6, 4, 5)),
    "GroupNorm-3d-no-affine": (lambda nn: nn.GroupNorm(3, 6, affine=False), (3, 6, 7)),
    "RMSNorm": (lambda nn: nn.RMSNorm(7), (4, 5, 7)),
    "RMSNorm-2dims-eps": (lambda nn: nn.RMSNorm((5, 7), eps=1e-3), (3, 5, 7)),
}
WITH_RUNNING_STATS = [name for name, (make, _) in LAYERS.items()
                      if getattr(make(torch.nn), "running_mean", None) is not None]
HALF = (torch.float16, torch.bfloat16)
# input dtype -> (tolerance dtype, scale) for bncore vs torch.nn: with half inputs both results are rounded
# to half, so they may lie up to twice the half tolerance apart
VS_TORCH = {torch.float32: ("float32", 1.0), torch.float16: ("float16", 2.0), torch.bfloat16: ("bfloat16", 2.0)}
# running statistics and parameter gradients stay float32 with half inputs: sums of exactly the same half
# values in float32, in different orders
MIXED_FLOAT32_SCALE = 10.0


def randomize(module, gen):
    """Parameters and running statistics away from their defaults (weight ~ 1, var > 0)."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.num_batches_tracked.fill_(3)
    return module


def pair(name, gen, dtype=torch.float32):
    """(torch.nn module, bncore module) of layer `name`, with the same random state in `dtype`."""
    make, shape = LAYERS[name]
    ref = randomize(make(torch.nn).to(dtype), gen)
    ours = make(bt).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, shape


def run_step(module, x, dy):
    """Forward and backward of one step: (output, grad_input, {parameter name: grad})."""
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def sgd(module, grads, lr=0.1):
    with torch.no_grad():
        for n, p in module.named_parameters():
            p -= lr * grads[n]


# ---------------------------------------------------------------- import


def test_import_bncore_does_not_import_torch():
    code = "import sys, bncore; assert 'torch' not in sys.modules, 'bncore imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- gradcheck


def _gradcheck(module, x):
    names = [n for n, p in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradcheck_training(name):
    gen = torch.Generator().manual_seed(0)
    _, ours, shape = pair(name, gen, torch.float64)
    _gradcheck(ours.train(), torch.randn(shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("name", WITH_RUNNING_STATS)
def test_gradcheck_eval_with_running_stats(name):
    gen = torch.Generator().manual_seed(1)
    _, ours, shape = pair(name, gen, torch.float64)
    _gradcheck(ours.eval(), torch.randn(shape, generator=gen, dtype=torch.float64))


# ---------------------------------------------------------------- side by side with torch.nn


def _assert_states_equal_within(ours, ref, tol_dtype, scale, msg):
    s_ours, s_ref = ours.state_dict(), ref.state_dict()
    assert list(s_ours) == list(s_ref), msg
    for key in s_ref:
        assert s_ours[key].dtype == s_ref[key].dtype and s_ours[key].shape == s_ref[key].shape, f"{msg}: {key}"
        if key == "num_batches_tracked":
            assert torch.equal(s_ours[key], s_ref[key]), f"{msg}: {key}"
        else:
            assert_close(s_ours[key], s_ref[key], tol_dtype, scale=scale, err_msg=f"{msg}: {key}")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own RMSNorm, mixed
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_steps_match_torch_nn(name, dtype):
    """3 training steps then 1 in eval mode; half inputs run with float32 parameters and buffers (torch's
    mixed mode). Both modules take the same SGD step (torch's gradients), so that each step compares the
    layer on equal parameters; the running statistics evolve on their own."""
    gen = torch.Generator().manual_seed(2)
    ref, ours, shape = pair(name, gen)
    tol_dtype, scale = VS_TORCH[dtype]
    param_tol = ("float32", MIXED_FLOAT32_SCALE) if dtype in HALF else (tol_dtype, scale)
    for step, training in enumerate([True, True, True, False]):
        msg = f"step {step} ({'train' if training else 'eval'})"
        ref.train(training)
        ours.train(training)
        x = (torch.randn(shape, generator=gen) * 1.5 + 0.3 * step).to(dtype)
        dy = torch.randn(shape, generator=gen).to(dtype)
        y_r, dx_r, g_r = run_step(ref, x, dy)
        y_b, dx_b, g_b = run_step(ours, x, dy)
        assert y_b.dtype == dtype and dx_b.dtype == dtype and y_b.shape == x.shape
        assert_close(y_b, y_r, tol_dtype, scale=scale, err_msg=f"{msg}: output")
        assert_close(dx_b, dx_r, tol_dtype, "grad", scale=scale, err_msg=f"{msg}: grad_input")
        assert list(g_b) == list(g_r)
        for n in g_r:
            assert g_b[n].dtype == torch.float32, f"{msg}: grad of {n} must have the parameter's dtype"
            # torch's mixed-mode parameter gradients pass through the half dtype: the input's tolerance
            assert_close(g_b[n], g_r[n], tol_dtype, "grad", scale=scale, err_msg=f"{msg}: grad of {n}")
        sgd(ref, g_r)
        sgd(ours, g_r)
        _assert_states_equal_within(ours, ref, *param_tol, msg)


def test_parameter_gradients_have_parameter_dtype_and_none_where_not_needed():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float16, requires_grad=True)
    ours = bt.BatchNorm2d(3)
    ours.weight.requires_grad_(False)
    y = ours(x)
    grads = y.grad_fn.apply(torch.ones_like(y))  # the op's autograd formula's own return value
    assert grads[0].dtype == torch.float16 and grads[0].shape == x.shape
    assert grads[1] is None  # weight: no grad needed
    assert grads[2].dtype == torch.float32
    assert all(g is None for g in grads[3:])  # running statistics and scalars
    y = ours(x.detach())
    assert y.grad_fn.apply(torch.ones_like(y))[0] is None  # input: no grad needed


def test_bias_without_weight_gets_its_gradient():
    """bncore's backward gives grad_bias only with a weight; a layer whose weight was removed keeps it."""
    gen = torch.Generator().manual_seed(3)
    ref, ours, shape = pair("BatchNorm2d", gen)
    ref.weight = ours.weight = None
    x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    y_r, dx_r, g_r = run_step(ref, x, dy)
    y_b, dx_b, g_b = run_step(ours, x, dy)
    assert list(g_b) == ["bias"]
    assert_close(y_b, y_r, "float32")
    assert_close(dx_b, dx_r, "float32", "grad")
    assert_close(g_b["bias"], g_r["bias"], "float32", "grad")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_running_stats_update_without_autograd(context):
    gen = torch.Generator().manual_seed(4)
    ref, ours, shape = pair("BatchNorm2d", gen)
    x = torch.randn(shape, generator=gen)
    with getattr(torch, context)():
        y_r, y_b = ref(x), ours(x)
    assert_close(y_b, y_r, "float32")
    _assert_states_equal_within(ours, ref, "float32", 1.0, context)


def test_state_dict_round_trip_torch_bncore_torch():
    gen = torch.Generator().manual_seed(5)
    for name in LAYERS:
        make, shape = LAYERS[name]
        ref = randomize(make(torch.nn), gen)
        ours = make(bt)
        ours.load_state_dict(ref.state_dict())
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), f"{name}: {key} changed on load"
        for _ in range(2):
            run_step(ours, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        buffer = io.BytesIO()
        torch.save(ours.state_dict(), buffer)
        buffer.seek(0)
        back = make(torch.nn)
        back.load_state_dict(torch.load(buffer))
        s_ours, s_back = ours.state_dict(), back.state_dict()
        assert list(s_back) == list(s_ours), name
        for key in s_ours:
            assert s_back[key].dtype == s_ours[key].dtype and torch.equal(s_back[key], s_ours[key]), f"{name}: {key}"


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("name, fmt", [("BatchNorm2d", "channels_last"), ("BatchNorm3d", "channels_last_3d"),
                                       ("GroupNorm", "channels_last"), ("InstanceNorm2d", "channels_last")])
@pytest.mark.parametrize("grad_layout", ["contiguous", "same"])
def test_channels_last_in_channels_last_out(name, fmt, grad_layout):
    gen = torch.Generator().manual_seed(6)
    ref, ours, shape = pair(name, gen)
    memory_format = getattr(torch, fmt)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape, generator=gen)
    if grad_layout == "same":
        dy = dy.contiguous(memory_format=memory_format)
    y = ours(x)
    assert y.is_contiguous(memory_format=memory_format)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.is_contiguous(memory_format=memory_format)
    y_r = ref(x)
    (dx_r,) = torch.autograd.grad(y_r, x, dy)
    assert_close(y, y_r, "float32")
    assert_close(dx, dx_r, "float32", "grad")


STRIDED_INPUTS = {
    "reversed-strides": lambda shape, gen: torch.randn(shape[::-1], generator=gen).permute(
        *reversed(range(len(shape)))),
    "sliced": lambda shape, gen: torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., 1::2],
}


@pytest.mark.parametrize("layout", list(STRIDED_INPUTS))
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d", "LayerNorm-2dims", "GroupNorm", "RMSNorm"])
def test_strided_input_and_broadcast_grad_output(name, layout):
    """Non-contiguous input, and a grad_output broadcast with stride 0 (as ``y.sum()`` gives). torch.nn runs
    on contiguous copies: its CPU batch norm backward is itself wrong for some strided inputs."""
    gen = torch.Generator().manual_seed(16)
    ref, ours, shape = pair(name, gen)
    x = STRIDED_INPUTS[layout](shape, gen).requires_grad_()
    assert not x.is_contiguous()
    dy = torch.randn(shape[-1], generator=gen).expand(shape)
    y = ours(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = x.detach().contiguous().requires_grad_()
    y_ref = ref(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.contiguous())
    assert_close(y, y_ref, "float32")
    assert_close(dx, dx_ref, "float32", "grad")


# ---------------------------------------------------------------- convert


def small_cnn():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 10))


# bncore vs torch.nn over 20 SGD steps (momentum 0.9) of the same float32 model: the differences of one
# step (float32 rounding in different summation orders) are carried into the next by the weights, so the
# parameters' absolute floor is that of the gradients (lr * 1 / (1 - momentum) ~ 0.5 per step). Measured
# worst cases use 10 to 25 % of each tolerance.
TRAINING_TOLERANCES = {
    "loss": Tol(rtol=1e-5, atol=1e-6),
    "grad": Tol(rtol=1e-3, atol=1e-5),
    "running": Tol(rtol=1e-4, atol=1e-5),
    "param": Tol(rtol=1e-4, atol=1e-5),
}


def assert_within(actual, expected, kind, msg):
    t = TRAINING_TOLERANCES[kind]
    torch.testing.assert_close(actual, expected, rtol=t.rtol, atol=t.atol, msg=lambda m: f"{msg}: {m}")


def test_convert_small_cnn_trains_like_the_original():
    torch.manual_seed(7)
    original = small_cnn()
    reference = copy.deepcopy(original)
    model = bt.convert(original)
    assert [type(m).__module__ for m in model if "Norm" in type(m).__name__] == ["bncore.torch"] * 4
    gen = torch.Generator().manual_seed(8)
    data = torch.randn(16, 3, 12, 12, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    opt_model = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(20):
        batch = slice((step % 4) * 4, (step % 4) * 4 + 4)
        x, t = data[batch] + 0.1 * step, labels[batch]
        for net, opt in ((model, opt_model), (reference, opt_ref)):
            opt.zero_grad()
            loss = loss_fn(net(x), t)
            loss.backward()
            losses.append(loss.detach())
        msg = f"step {step}"
        assert_within(losses[-2], losses[-1], "loss", f"{msg}: loss")
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert_within(p.grad, q.grad, "grad", f"{msg}: grad of {name}")
        opt_model.step()
        opt_ref.step()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert_within(p.detach(), q.detach(), "param", f"{msg}: {name}")
        for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b, c), f"{msg}: {name}"
            else:
                assert_within(b, c, "running", f"{msg}: {name}")
    assert losses[-1] < losses[0]  # it learned something, so the comparison is not of a frozen model
    model.eval()
    reference.eval()
    assert_within(model(data), reference(data), "grad", "eval output")


class CustomBatchNorm(torch.nn.BatchNorm2d):
    """A subclass with torch's forward: convert gives it bncore's."""


class OwnForwardBatchNorm(torch.nn.BatchNorm2d):
    """A subclass may change the forward: convert leaves it alone."""

    def forward(self, input):
        return super().forward(input) * 2


def test_convert_keeps_parameters_buffers_modes_and_dtypes():
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None),
        nn.ModuleDict({"gn": nn.GroupNorm(2, 4, affine=False), "inorm": nn.InstanceNorm2d(4, affine=True)}),
        nn.ModuleList([nn.LayerNorm(4, bias=False).double(), nn.RMSNorm(4, eps=1e-3)]),
        nn.BatchNorm1d(4, track_running_stats=False), nn.InstanceNorm3d(2, track_running_stats=True),
        nn.SyncBatchNorm(4), CustomBatchNorm(4), OwnForwardBatchNorm(4), nn.Linear(4, 4))
    model[1].eval()
    model[3][1].eval()
    randomize(model[1], torch.Generator().manual_seed(9))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    text = repr(model)
    converted = bt.convert(model)
    assert converted is model  # a container is changed in place
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["1"] is bt.BatchNorm2d and kinds["2.gn"] is bt.GroupNorm and kinds["2.inorm"] is bt.InstanceNorm2d
    assert kinds["3.0"] is bt.LayerNorm and kinds["3.1"] is bt.RMSNorm and kinds["4"] is bt.BatchNorm1d
    assert kinds["5"] is bt.InstanceNorm3d
    assert kinds["6"] is nn.SyncBatchNorm and kinds["8"] is OwnForwardBatchNorm  # left alone
    assert isinstance(model[7], CustomBatchNorm) and isinstance(model[7], bt._BatchNormForward)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert list(dict(model.named_parameters())) == list(params)
    for name, p in model.named_parameters():
        assert p is params[name], name
    for name, b in model.named_buffers():
        assert b is buffers[name], name
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model[3][0].weight.dtype == torch.float64 and model[3][0].bias is None
    assert model[1].momentum is None and model[3][1].eps == 1e-3 and model[2]["gn"].weight is None
    assert model[4].running_mean is None and model[4].track_running_stats is False
    assert repr(model) != text and repr(model).replace("bncore.", "") == text  # every hyperparameter


def test_convert_norm_layer_itself_and_devices():
    bn = torch.nn.BatchNorm2d(3)
    out = bt.convert(bn)
    assert type(out) is bt.BatchNorm2d and out.weight is bn.weight and out.running_var is bn.running_var
    lazy = torch.nn.LazyBatchNorm2d()
    assert bt.convert(lazy) is lazy
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    bt.convert(model)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_keeps_cuda_device():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).cuda()
    bt.convert(model)
    assert all(t.device.type == "cuda" for t in model.state_dict().values())


# ---------------------------------------------------------------- errors


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_bitwise_unchanged(module, before):
    after = module.state_dict()
    for key, value in before.items():
        bits = torch.int64 if value.dtype == torch.int64 else torch.int32
        assert torch.equal(after[key].view(bits), value.view(bits)), f"{key} changed"


FAILING_FORWARDS = {
    "wrong-dim": (torch.randn(4, 3, 5), ValueError),
    "wrong-channels": (torch.randn(4, 5, 2, 2), ValueError),
    "one-value-per-channel": (torch.randn(1, 3, 1, 1), ValueError),
    "integer-input": (torch.ones(4, 3, 2, 2, dtype=torch.int32), TypeError),
}


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", list(FAILING_FORWARDS))
def test_failing_batch_norm_forward_changes_no_buffer(case, momentum, grad):
    ours = randomize(bt.BatchNorm2d(3, momentum=momentum), torch.Generator().manual_seed(10))
    before = _snapshot(ours)
    x, error = FAILING_FORWARDS[case]
    with torch.set_grad_enabled(grad), pytest.raises(error):
        ours(x)
    _assert_bitwise_unchanged(ours, before)


def test_failing_forward_inside_bncore_changes_no_buffer(monkeypatch):
    """An error raised by bncore itself (a bad momentum, then an injected failure of the C call)."""
    ours = randomize(bt.BatchNorm2d(3), torch.Generator().manual_seed(11))
    before = _snapshot(ours)
    ours.momentum = 2.0
    with pytest.raises(ValueError, match="momentum"):
        ours(torch.randn(4, 3, 2, 2))
    _assert_bitwise_unchanged(ours, before)
    ours.momentum = 0.1

    def failing_call(*args):
        raise bncore.functional._core.InternalError("injected failure")

    # both C entry points: the checked path's, and the one C call that batch norm's op tries first
    monkeypatch.setattr(bncore.functional._core, "norm_forward", failing_call)
    monkeypatch.setattr(bncore.functional._core, "exchange_forward", failing_call)
    for module in (ours, randomize(bt.InstanceNorm2d(3, track_running_stats=True),
                                   torch.Generator().manual_seed(12))):
        before = _snapshot(module)
        with pytest.raises(bncore.functional._core.InternalError, match="injected"):
            module(torch.randn(4, 3, 2, 2))
        _assert_bitwise_unchanged(module, before)


def test_failing_instance_norm_forward_changes_no_buffer():
    ours = randomize(bt.InstanceNorm2d(3, affine=True, track_running_stats=True), torch.Generator().manual_seed(13))
    before = _snapshot(ours)
    for x in (torch.randn(3, 5), torch.randn(2, 4, 3, 3), torch.randn(2, 3, 1, 1)):
        with pytest.raises(ValueError):
            ours(x)
    _assert_bitwise_unchanged(ours, before)


@pytest.mark.parametrize("make, x", [
    (lambda nn: nn.BatchNorm1d(3), torch.randn(2, 3, 4, 4)),
    (lambda nn: nn.BatchNorm2d(3), torch.randn(2, 3, 4)),
    (lambda nn: nn.BatchNorm3d(3), torch.randn(2, 3, 4, 4)),
    (lambda nn: nn.BatchNorm2d(3, eps=0.0), torch.randn(2, 3, 4, 4)),
    (lambda nn: nn.BatchNorm2d(3, eps=-1.0).eval(), torch.randn(2, 3, 4, 4)),
    (lambda nn: nn.InstanceNorm1d(3), torch.randn(3)),
    (lambda nn: nn.InstanceNorm2d(3, affine=True), torch.randn(2, 4, 3, 3)),
    (lambda nn: nn.InstanceNorm3d(3), torch.randn(2, 3, 4, 4, 4, 4)),
    (lambda nn: nn.GroupNorm(1, 3), torch.randn(3)),
    (lambda nn: nn.GroupNorm(3, 3), torch.randn(1, 3)),
])
def test_input_checks_raise_as_torch_nn(make, x):
    with pytest.raises(Exception) as expected:
        make(torch.nn)(x)
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        make(bt)(x)


def test_instance_norm_warns_as_torch_nn_on_unused_num_features():
    x = torch.randn(2, 4, 5)
    with pytest.warns(UserWarning, match="does not match num_features"):
        y_r = torch.nn.InstanceNorm1d(3)(x)
    with pytest.warns(UserWarning, match="does not match num_features"):
        y_b = bt.InstanceNorm1d(3)(x)
    assert_close(y_b, y_r, "float32")


@pytest.mark.parametrize("name", list(LAYERS))
def test_without_autograd_same_bits_as_with(name):
    """Under no_grad (no graph, no saved statistics) the output and buffers are those of the autograd
    path, bit for bit, in training and in eval mode."""
    gen = torch.Generator().manual_seed(14)
    _, ours, shape = pair(name, gen)
    twin = copy.deepcopy(ours)
    for training in (True, False):
        ours.train(training)
        twin.train(training)
        x = torch.randn(shape, generator=gen)
        y = ours(x.clone().requires_grad_())
        assert y.requires_grad
        with torch.no_grad():
            y_plain = twin(x)
        assert not y_plain.requires_grad
        assert torch.equal(y.detach(), y_plain)
        for (key, a), b in zip(ours.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm1d-tracked"])
def test_running_stats_writes_are_seen_by_autograd(name, grad):
    """bncore writes the buffers through DLPack; autograd must see it as it sees torch's in-place update."""
    gen = torch.Generator().manual_seed(15)
    _, ours, shape = pair(name, gen)
    scale = torch.ones_like(ours.running_var, requires_grad=True)
    saved_buffer = (scale * ours.running_var).sum()  # keeps running_var for its backward
    with torch.set_grad_enabled(grad):
        ours(torch.randn(shape, generator=gen, requires_grad=grad))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_buffer.backward()
    ours.eval()
    saved_buffer = (scale * ours.running_var).sum()
    ours(torch.randn(shape, generator=gen))  # eval mode reads the buffers only
    saved_buffer.backward()
