"""A few thousand inputs of tools/fuzz_dlpack.py in the test run (the long runs are by hand or in CI).

Each input builds forged DLPack capsules, calls the public API with them, and checks that
the call returned or raised one of the accepted exception types and that every forged
tensor's deleter ran once per capsule; the seed makes a failure reproducible.
"""
from __future__ import annotations

import importlib.util
import os
import random

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "fuzz_dlpack.py")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("fuzz_dlpack", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Harness(use_torch=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_forged_capsules_are_answered_not_crashed(harness, seed):
    rng = random.Random(seed)
    for _ in range(1000):
        harness.one(rng.randbytes(512))
