"""Every default that bncore copies from PyTorch is PyTorch's: pinned against torch's own signatures
(functions, torch.nn constructors), and behaviourally: one call with defaults on both sides gives the
same output and the same running statistics. A changed default (momentum 0.1 -> 0.01, eps 1e-5 ->
1e-6) changes the numbers by far more than float64's tolerance, so these tests see it.
"""
from __future__ import annotations

import inspect

import pytest

import bncore
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="torch's signatures are the reference for the defaults")
F = torch.nn.functional
import bncore.torch as bt  # noqa: E402

# bncore function -> its torch.nn.functional namesake
FUNCTIONS = {
    "batch_norm": F.batch_norm, "batch_norm_forward": F.batch_norm,
    "layer_norm": F.layer_norm, "layer_norm_forward": F.layer_norm,
    "group_norm": F.group_norm, "group_norm_forward": F.group_norm,
    "instance_norm": F.instance_norm, "instance_norm_forward": F.instance_norm,
    "rms_norm": F.rms_norm, "rms_norm_forward": F.rms_norm,
}


def _positional(sig):
    return [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_function_arguments_and_defaults_are_torchs(name):
    """Argument for argument as torch.nn.functional: the same positional names in the same order, and
    every default torch has, bncore has too, with the same value."""
    ours = inspect.signature(getattr(bncore, name))
    theirs = inspect.signature(FUNCTIONS[name])
    t_pos = [p.name for p in _positional(theirs)]
    assert [p.name for p in _positional(ours)][:len(t_pos)] == t_pos
    for p in theirs.parameters.values():
        if p.default is inspect.Parameter.empty:
            continue
        assert p.name in ours.parameters, f"{name}: no {p.name}"
        got = ours.parameters[p.name].default
        assert got == p.default and type(got) is type(p.default), f"{name}({p.name}={got!r}): torch's is {p.default!r}"


# bncore layer -> (torch.nn module, constructor arguments both take)
LAYERS = {
    "BatchNorm": (torch.nn.BatchNorm2d, (3,)),
    "InstanceNorm": (torch.nn.InstanceNorm2d, (3,)),
    "LayerNorm": (torch.nn.LayerNorm, ((4, 5),)),
    "GroupNorm": (torch.nn.GroupNorm, (2, 6)),
    "RMSNorm": (torch.nn.RMSNorm, ((4, 5),)),
}
HYPERPARAMETERS = ("eps", "momentum", "affine", "track_running_stats", "elementwise_affine", "normalized_shape",
                   "num_groups", "num_channels", "num_features")


# torch 2.13 gave these modules a keyword-only `bias=True` (False: no shift); bncore's layers do not
# take it yet (they have affine, and BatchNorm center/scale). Listed so that any other gap fails.
NOT_YET = {("BatchNorm", "bias"), ("InstanceNorm", "bias"), ("GroupNorm", "bias")}


def _torch_defaults(cls):
    return {p.name: p.default for p in inspect.signature(cls).parameters.values()
            if p.default is not inspect.Parameter.empty and p.name not in ("device", "dtype")}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_constructor_defaults_are_torchs(name):
    """bncore's layers: every constructor default of the torch.nn module, read from torch's signature,
    is bncore's, both in the signature (where it is a value, not a convention sentinel) and on the
    object built with defaults."""
    t_cls, args = LAYERS[name]
    ours = inspect.signature(getattr(bncore, name)).parameters
    mine, theirs = getattr(bncore, name)(*args), t_cls(*args)
    for arg, default in _torch_defaults(t_cls).items():
        if (name, arg) in NOT_YET:
            assert arg not in ours, f"{name} takes {arg} now: drop it from NOT_YET"
            continue
        assert arg in ours, f"{name}: no {arg}"
        got = ours[arg].default
        if isinstance(got, (int, float, bool, type(None))):
            assert got == default and type(got) is type(default), f"{name}({arg}={got!r}): torch's is {default!r}"
    for attr in HYPERPARAMETERS:
        if hasattr(theirs, attr) and hasattr(mine, attr):
            assert getattr(mine, attr) == getattr(theirs, attr), f"{name}.{attr}"
    assert hasattr(mine, "eps") and mine.eps == theirs.eps


ADAPTER = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "GroupNorm", "RMSNorm"]


@pytest.mark.parametrize("name", ADAPTER)
def test_adapter_signatures_are_torchs(name):
    """torch.nn's signature; bncore's batch norms add one keyword-only argument, virtual_batch_size=None."""
    mine, theirs = inspect.signature(getattr(bt, name)), inspect.signature(getattr(torch.nn, name))
    if name.startswith("BatchNorm"):
        extra = mine.parameters["virtual_batch_size"]
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is None
        mine = mine.replace(parameters=[p for p in mine.parameters.values() if p.name != "virtual_batch_size"])
    assert mine == theirs


# ---------------------------------------------------------------- behaviour: one call with defaults, both sides


def _x(shape, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * spread + 0.5


# small spreads make eps matter: var = spread^2 next to eps = 1e-5 (RMS: eps = float64's epsilon)
FUNCTION_CALLS = {
    "batch_norm-train": (lambda m, x, rm, rv: m.batch_norm(x, rm, rv, training=True), (6, 3, 4), 3e-3),
    "batch_norm-eval": (lambda m, x, rm, rv: m.batch_norm(x, rm, rv), (6, 3, 4), 1.0),
    "instance_norm": (lambda m, x, rm, rv: m.instance_norm(x, rm, rv), (2, 3, 8), 3e-3),
    "layer_norm": (lambda m, x, rm, rv: m.layer_norm(x, (3, 8)), (2, 3, 8), 3e-3),
    "group_norm": (lambda m, x, rm, rv: m.group_norm(x, 3), (2, 6, 8), 3e-3),
    "rms_norm": (lambda m, x, rm, rv: m.rms_norm(x - 0.5, (3, 8)), (2, 3, 8), 3e-8),
}


@pytest.mark.parametrize("name", list(FUNCTION_CALLS))
def test_function_defaults_behave_as_torchs(name):
    call, shape, spread = FUNCTION_CALLS[name]
    x = _x(shape, spread=spread)
    c = shape[1]
    rm_t, rv_t = torch.linspace(-1, 1, c, dtype=torch.float64), torch.linspace(0.5, 2, c, dtype=torch.float64)
    rm_b, rv_b = rm_t.clone(), rv_t.clone()
    y_t = call(F, x, rm_t, rv_t)
    y_b = call(bncore, x, rm_b, rv_b)
    assert_close(y_b, y_t, "float64", err_msg="output")
    assert_close(rm_b, rm_t, "float64", err_msg="running_mean")
    assert_close(rv_b, rv_t, "float64", err_msg="running_var")


# module pairs built with defaults only (the input's shape is the only other choice)
MODULES = {
    "BatchNorm": (lambda: torch.nn.BatchNorm1d(3), lambda: bncore.BatchNorm(3, dtype="float64"), (6, 3, 4), 3e-3),
    "InstanceNorm": (lambda: torch.nn.InstanceNorm1d(3, track_running_stats=True),
                     lambda: bncore.InstanceNorm(3, track_running_stats=True, dtype="float64"), (2, 3, 8), 3e-3),
    "LayerNorm": (lambda: torch.nn.LayerNorm(8), lambda: bncore.LayerNorm(8, dtype="float64"), (2, 3, 8), 3e-3),
    "GroupNorm": (lambda: torch.nn.GroupNorm(3, 6), lambda: bncore.GroupNorm(3, 6, dtype="float64"), (2, 6, 8), 3e-3),
    "RMSNorm": (lambda: torch.nn.RMSNorm(8), lambda: bncore.RMSNorm(8, dtype="float64"), (2, 3, 8), 3e-8),
}


def _steps(t_mod, other, shape, spread, to_other):
    for step in range(2):
        x = _x(shape, seed=step, spread=spread) - (0.5 if isinstance(t_mod, torch.nn.RMSNorm) else 0.0)
        with torch.no_grad():
            y_t = t_mod(x)
            y_o = other(to_other(x))
        assert_close(y_o, y_t, "float64", err_msg=f"step {step} output")
    t_state, o_state = t_mod.state_dict(), other.state_dict()
    for k, v in t_state.items():
        if k != "num_batches_tracked":
            assert_close(o_state[k], v, "float64", err_msg=k)


@pytest.mark.parametrize("name", list(MODULES))
def test_layer_defaults_behave_as_torchs(name):
    make_t, make_b, shape, spread = MODULES[name]
    _steps(make_t().double(), make_b(), shape, spread, lambda x: x)


@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm1d", "LayerNorm", "GroupNorm", "RMSNorm"])
@pytest.mark.parametrize("route", ["class", "convert"])
def test_adapter_defaults_behave_as_torchs(name, route):
    """bncore.torch modules built with defaults (directly, or by convert from a default torch module)
    follow torch's: the same outputs and running statistics over two training steps."""
    args = {"BatchNorm1d": (3,), "InstanceNorm1d": (3,), "LayerNorm": (8,), "GroupNorm": (3, 6), "RMSNorm": (8,)}[name]
    kwargs = {"track_running_stats": True} if name == "InstanceNorm1d" else {}
    shape = (2, 6, 8) if name == "GroupNorm" else (6, 3, 8)
    t_mod = getattr(torch.nn, name)(*args, **kwargs).double()
    base = getattr(torch.nn, name)(*args, **kwargs).double()
    b_mod = getattr(bt, name)(*args, **kwargs).double() if route == "class" else bt.convert(base)
    assert type(b_mod) is getattr(bt, name)
    _steps(t_mod, b_mod, shape, 1e-8 if name == "RMSNorm" else 3e-3, lambda x: x)
