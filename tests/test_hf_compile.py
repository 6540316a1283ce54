"""Issue #12's done-when on real transformers models: `BertModel` (layer norm) and `ResNetModel` (batch
norm) from small configs, converted by `bncore.torch.convert`, train under
``torch.compile(fullgraph=True)`` with no graph break and the losses, parameters and running
statistics of eager bncore (and of torch.nn's own layers, within float32 tolerance); the compiled
graphs hold one bncore op per norm forward and one backward op per norm; `torch.export` of both runs
and gives eager's output. The inductor variant is marked slow."""
from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers' models (a test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from configs: nothing to download

import bncore.torch as bt  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402

from tolerances import tol  # noqa: E402

nn = torch.nn
STEPS = 3
LR = 0.05


# ---------------------------------------------------------------- the two models


def bert_case():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))

    def loss_of(out):
        return out.last_hidden_state.pow(2).mean() + out.pooler_output.mean()
    return model, (ids,), loss_of, nn.LayerNorm, "bncore.layer_norm"


def resnet_case():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic")
    torch.manual_seed(0)
    model = transformers.ResNetModel(config)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def loss_of(out):
        return out.pooler_output.pow(2).mean() + out.last_hidden_state.mean()
    return model, (x,), loss_of, nn.BatchNorm2d, "bncore.batch_norm"


CASES = {"bert": bert_case, "resnet": resnet_case}


def _converted(model, norm_cls):
    """The model converted, after checking that convert's report replaced every norm of `norm_cls` and
    skipped none."""
    names = {name for name, m in model.named_modules() if type(m) is norm_cls}
    assert names, "the config builds no norm layer: the test would check nothing"
    converted, report = bt.convert(copy.deepcopy(model), report=True)
    assert report.skipped == []
    assert {name for name, _, _ in report.replaced} == names
    assert all(new == f"bncore.{norm_cls.__name__}" for _, _, new in report.replaced)
    assert not any(type(m) is norm_cls for m in converted.modules())
    return converted, len(names)


class RecordingBackend:
    """aot_eager that keeps, for each compiled forward and backward graph, the targets of its nodes."""

    def __init__(self):
        self.forward_graphs: list[list[str]] = []
        self.backward_graphs: list[list[str]] = []

    def _keep(self, graphs):
        def compiler(gm, example_inputs):
            graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
            return make_boxed_func(gm.forward)
        return compiler

    def backend(self):
        return aot_autograd(fw_compiler=self._keep(self.forward_graphs), bw_compiler=self._keep(self.backward_graphs))


def _train(model, inputs, loss_of, steps=STEPS):
    """Losses of `steps` SGD steps, each taken on the same inputs."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _assert_same_state(got, want, kind="value", scale=1.0):
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    t = tol(torch.float32, kind)
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=t.rtol * scale, atol=t.atol * scale, msg=name)


# ---------------------------------------------------------------- compile


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_converted_model_trains_like_eager_with_no_graph_break(name):
    model, inputs, loss_of, norm_cls, op_name = CASES[name]()
    stock = copy.deepcopy(model)
    eager, n_norms = _converted(model, norm_cls)
    compiled_model, _ = _converted(model, norm_cls)
    recording = RecordingBackend()
    counters.clear()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recording.backend())

    got = _train(compiled, inputs, loss_of)
    want = _train(eager, inputs, loss_of)
    stock_losses = _train(stock, inputs, loss_of)

    assert dict(counters["graph_break"]) == {}
    # one graph, compiled once: the later steps reuse it (no recompilation), and bncore is in it,
    # once per norm forward and once per norm backward (it did not fall out of the model)
    assert len(recording.forward_graphs) == 1 and len(recording.backward_graphs) == 1
    assert recording.forward_graphs[0].count(f"{op_name}.default") == n_norms
    assert recording.backward_graphs[0].count(f"{op_name}_backward.default") == n_norms
    assert not any("native_batch_norm" in t or "native_layer_norm" in t for t in recording.forward_graphs[0])

    t = tol(torch.float32)
    torch.testing.assert_close(got, want, rtol=t.rtol, atol=t.atol)
    _assert_same_state(compiled_model, eager)  # parameters after the steps, running statistics too
    # torch.nn's own layers: the same training within float32 tolerance (other summation orders)
    torch.testing.assert_close(want, stock_losses, rtol=t.rtol * 10, atol=t.atol * 10)
    _assert_same_state(eager, stock, kind="grad", scale=10)
    if norm_cls is nn.BatchNorm2d:
        tracked = [int(m.num_batches_tracked) for m in compiled_model.modules() if isinstance(m, bt.BatchNorm2d)]
        assert tracked == [STEPS] * n_norms


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_inductor_compiled_converted_model_trains_like_eager(name):
    model, inputs, loss_of, norm_cls, _ = CASES[name]()
    eager, _ = _converted(model, norm_cls)
    compiled_model, _ = _converted(model, norm_cls)
    counters.clear()
    got = _train(torch.compile(compiled_model, fullgraph=True, backend="inductor"), inputs, loss_of)
    want = _train(eager, inputs, loss_of)
    assert dict(counters["graph_break"]) == {}
    t = tol(torch.float32, "grad")
    torch.testing.assert_close(got, want, rtol=t.rtol * 10, atol=t.atol * 10)
    _assert_same_state(compiled_model, eager, kind="grad", scale=10)


# ---------------------------------------------------------------- export


def _export_matches_eager(model, inputs, op_name):
    program = torch.export.export(model, inputs)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert f"{op_name}.default" in targets
    reference = copy.deepcopy(model)
    exported = program.module()
    got, want = exported(*inputs), reference(*inputs)
    t = tol(torch.float32)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=t.rtol, atol=t.atol)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=t.rtol, atol=t.atol)
    return exported, reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_in_eval_mode_runs_like_eager(name):
    model, inputs, _, norm_cls, op_name = CASES[name]()
    converted, _ = _converted(model, norm_cls)
    _export_matches_eager(converted.eval(), inputs, op_name)


def test_export_of_resnet_in_train_mode_updates_running_statistics_like_eager():
    model, inputs, _, norm_cls, op_name = resnet_case()
    converted, _ = _converted(model, norm_cls)
    exported, reference = _export_matches_eager(converted.train(), inputs, op_name)
    state, want = exported.state_dict(), reference.state_dict()
    t = tol(torch.float32)
    moved = [name for name in want if name.endswith("running_mean")]
    assert moved and all(not torch.equal(want[name], torch.zeros_like(want[name])) for name in moved)
    for name, value in want.items():
        torch.testing.assert_close(state[name], value, rtol=t.rtol, atol=t.atol, msg=name)
