"""bncore.keras.BatchNormalization: Keras's own test file passes with it swapped in for
keras.layers.BatchNormalization, on the torch and jax backends; seed-style training (Dense, then
BatchNormalization(axis=1), then relu, Adam) gives Keras's own results; it serializes as bncore's.

Each backend runs in its own process: Keras picks its backend once, at import."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

if importlib.util.find_spec("keras") is None:  # found, not imported: Keras picks its backend at import
    pytest.skip("Keras 3 is a test extra", allow_module_level=True)
HERE = pathlib.Path(__file__).parent
BACKENDS = ["torch", pytest.param("jax", marks=pytest.mark.slow)]


def run(args, backend, tmp_path, timeout=600):
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=path, BNCORE_SWAP_REPORT=str(tmp_path / "calls"),
               HF_HUB_OFFLINE="1")
    pytest.importorskip(backend, reason=f"the {backend} backend of Keras needs {backend}")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def keras_test_file():
    spec = importlib.util.find_spec("keras")
    assert spec is not None and spec.origin is not None
    path = pathlib.Path(spec.origin).parent / "src" / "layers" / "normalization" / "batch_normalization_test.py"
    if not path.exists():
        pytest.skip(f"this keras wheel ships no {path.name}")
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_own_tests_pass_with_bncore_swapped_in(backend, tmp_path):
    proc = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "keras_swap_plugin",
                str(keras_test_file())], backend, tmp_path)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], tail
    calls = int((tmp_path / "calls").read_text())
    assert calls > 50, f"bncore computed only {calls} times: the swap did not take"


@pytest.mark.parametrize("renorm", [False, True], ids=["batch_norm", "renorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_style_training_gives_keras_results(backend, renorm, tmp_path):
    proc = run([str(HERE / "keras_fit_check.py")] + (["--renorm"] if renorm else []), backend, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["first_loss"] > result["loss"], result  # it trains
    assert result["losses"] < 1e-5, result  # 18 Adam steps, float32 rounding apart
    assert result["weights"] < 1e-5, result
    assert result["inference"] < 1e-5, result


def test_serialization_round_trip(tmp_path):
    script = f"""
import keras, numpy as np
from bncore.keras import BatchNormalization
m = keras.Sequential([keras.Input((4, 3)), BatchNormalization(axis=1, momentum=0.8, epsilon=1e-4, renorm=True)])
x = np.random.default_rng(0).standard_normal((8, 4, 3)).astype("float32")
m(x, training=True)
m.save({str(tmp_path / "m.keras")!r})
n = keras.saving.load_model({str(tmp_path / "m.keras")!r})
layer = n.layers[0]
assert type(layer) is BatchNormalization, type(layer)
assert keras.saving.get_registered_name(BatchNormalization) == "bncore>BatchNormalization"
assert (layer.axis, layer.momentum, layer.epsilon, layer.renorm) == (1, 0.8, 1e-4, True)
to_np = keras.ops.convert_to_numpy
np.testing.assert_array_equal(to_np(n(x, training=False)), to_np(m(x, training=False)))
print("ok")
"""
    proc = run(["-c", script], "torch", tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
