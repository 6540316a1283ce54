"""Run by test_cpu_levels.py in a subprocess with BNCORE_CPU_LEVEL set: prints the kernel level
this process runs, then one digest per case of every output of a forward and a backward."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch

import bncore
import bncore._core as _core


def _digest(outs) -> str:
    h = hashlib.sha256()
    for o in outs:
        if o is None:
            continue
        o = o.detach().contiguous()
        h.update((o.view(torch.int16) if o.dtype in (torch.bfloat16, torch.float16) else o).numpy().tobytes())
    return h.hexdigest()[:16]


def _data(shape, dtype, pshape, seed):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=shape) * 3 + 1e3 * (dtype == "float32")).to(getattr(torch, dtype))
    dy = torch.from_numpy(rng.normal(size=shape)).to(x.dtype)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=pshape)).to(x.dtype)
    b = torch.from_numpy(rng.normal(size=pshape)).to(x.dtype)
    return x, dy, w, b


def cases():
    for dtype in ("float32", "float64", "bfloat16", "float16"):
        # layer-norm rows: short (blocks of rows), a tail after the lanes, one piece, several pieces
        for n in (64, 100, 768, 5000):
            x, dy, w, b = _data((24, n), dtype, (n,), n)
            y, m, r = bncore.layer_norm_forward(x, (n,), w, b)
            yield f"layer {dtype} {n}", [y, m, r, *bncore.layer_norm_backward(dy, x, (n,), w, m, r)]
            y, r = bncore.rms_norm_forward(x, (n,), w)
            yield f"rms {dtype} {n}", [y, r, *bncore.rms_norm_backward(dy, x, (n,), w, r)]
        # batch norm: NCHW rows, channels-last rows of groups, and a 2-d column reduction
        # (channels-last rows of 64 and 2-d rows of 40 columns take the column blocks of 32 lanes)
        for shape, fmt in (((4, 8, 9, 11), torch.contiguous_format), ((4, 8, 9, 11), torch.channels_last),
                           ((2, 64, 5, 7), torch.channels_last), ((300, 40), None)):
            x, dy, w, b = _data(shape, dtype, (shape[1],), 7)
            if fmt is not None:
                x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
            y, m, r = bncore.batch_norm_forward(x, None, None, w, b, training=True)[:3]
            yield f"batch {dtype} {shape} {fmt}", [y, m, r, *bncore.batch_norm_backward(dy, x, w, m, r)]
        x, dy, w, b = _data((3, 12, 10, 10), dtype, (12,), 3)
        y, m, r = bncore.group_norm_forward(x, 4, w, b)
        yield f"group {dtype}", [y, m, r, *bncore.group_norm_backward(dy, x, 4, w, m, r)]
    # float16 bit patterns of every exponent, subnormals, the largest finite value, an infinity and a
    # signaling NaN: F16C's loads (x86-64-v3, v4) quiet that NaN at once, the bit code's arithmetic
    # later; the outputs' bits must not tell the two apart
    bits = np.random.default_rng(5).integers(0, 0x7c00, size=(8, 96)).astype(np.uint16)
    bits[0, 3], bits[1, 5] = 0x7C01, 0x7C00
    bits[2] &= 0x03FF
    bits[3, ::2] = 0x7BFF
    bits[4] |= 0x8000
    x = torch.from_numpy(bits.view(np.int16)).view(torch.float16)
    dy = torch.from_numpy(np.roll(bits, 1, axis=1).view(np.int16)).view(torch.float16)
    # weights from 1e-7 to 3e4: outputs from subnormal to past the largest finite value (inf)
    w = torch.logspace(-7, 4.5, 96, dtype=torch.float32).to(torch.float16)
    y, m, r = bncore.layer_norm_forward(x, (96,), w, w)
    yield "layer float16 specials", [y, m, r, *bncore.layer_norm_backward(dy, x, (96,), w, m, r)]
    y, m, r = bncore.batch_norm_forward(x, None, None, w, w, training=True)[:3]
    yield "batch float16 specials", [y, m, r, *bncore.batch_norm_backward(dy, x, w, m, r)]


if __name__ == "__main__":
    print(_core.cpu_kernel_level())
    for name, outs in cases():
        print(f"{name}: {_digest(outs)}")
    sys.stdout.flush()
