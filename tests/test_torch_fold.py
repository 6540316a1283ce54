"""bncore.torch.fold(model): batch norms after Conv / ConvTranspose / Linear folded into them, outputs
equal to the unfolded eval model; batch norms it cannot fold are refused, naming them."""
import copy

import pytest

torch = pytest.importorskip("torch", reason="bncore.torch needs PyTorch")
import bncore.torch as bt  # noqa: E402

nn = torch.nn


def randomize(model, seed=0):
    """Non-trivial running statistics and affine parameters in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def check(model, x, rtol=1e-5, atol=1e-5):
    model = randomize(model).eval()
    before = copy.deepcopy(model.state_dict())
    folded = bt.fold(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert not folded.training
    torch.testing.assert_close(folded(x), model(x), rtol=rtol, atol=atol)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    return folded


CASES = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 9, 9)),
    "conv2d-no-bias": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 7, 7)),
    "conv2d-groups": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), (2, 4, 7, 7)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (4, 3, 11)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (7, 6)),
    "convT2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6)), (2, 3, 5, 5)),
    "convT2d-groups": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)),
                       (2, 4, 5, 5)),
    "convT1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 8)),
    "no-affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (2, 3, 4, 4)),
    "bncore-bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4)), (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fold_equals_the_unfolded_eval_model(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    check(build(), torch.randn(shape))


class Residual(nn.Module):
    """Not a Sequential: found by tracing (the ResNet basic block's pattern)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def test_traced_model_folds_and_drops_its_batch_norms():
    torch.manual_seed(1)
    folded = check(Residual(), torch.randn(2, 4, 6, 6))
    assert isinstance(folded, torch.fx.GraphModule)
    assert folded.conv2.bias is not None


def test_inplace_changes_the_model_itself():
    torch.manual_seed(2)
    model = randomize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(5, 3)
    expected = model(x)
    out = bt.fold(model, inplace=True)
    assert isinstance(model[1], nn.Identity)
    for m in (out, model):  # the result and the model itself both compute the folded function
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_float64_folding_is_exact_to_rounding():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).double()
    check(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), rtol=1e-12, atol=1e-12)


class AfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        h = self.fc(x)
        return self.bn(h) + h  # the producer's output is read elsewhere too: folding would change it


@pytest.mark.parametrize("model, name", [
    (AfterRelu(), "bn"),
    (SharedOutput(), "bn"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), "1"),
    (nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "1"),
])
def test_unfoldable_batch_norms_are_refused_and_nothing_changes(model, name):
    before = copy.deepcopy(model.state_dict())
    model.train()
    with pytest.raises(ValueError, match=rf"fold: cannot fold.*\n  {name} \("):
        bt.fold(model, inplace=True)
    assert model.training  # not even its mode changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_argument_is_checked():
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module"):
        bt.fold("conv")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the Sequential walk folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_untraceable_model_folds_its_sequentials():
    torch.manual_seed(4)
    folded = check(Untraceable(), torch.randn(2, 3, 6, 6))
    assert not isinstance(folded, torch.fx.GraphModule)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.head[1], nn.Identity)
