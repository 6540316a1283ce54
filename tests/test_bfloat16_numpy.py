"""NumPy cannot export ml_dtypes bfloat16 arrays through DLPack: bncore refuses them with a message
that says what to do, and the suggested route gives the same numbers."""
import numpy as np
import pytest

import bncore

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (installed with JAX) makes NumPy bfloat16 arrays")


def test_numpy_bfloat16_is_refused_with_what_to_do():
    a = np.linspace(-2, 3, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"input: NumPy cannot export bfloat16.*torch.from_numpy"):
        bncore.batch_norm(a, training=True)


def test_the_suggested_route_works():
    torch = pytest.importorskip("torch", reason="the suggested route goes through PyTorch")
    a = np.linspace(-2, 3, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
    t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    y = bncore.batch_norm(t, training=True)
    ref = torch.nn.functional.batch_norm(t.float(), None, None, training=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
