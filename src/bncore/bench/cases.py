"""What the bench measures: the cases (op, pass, shape, dtype, layout), the suites that list them,
and the byte model that turns a time into GB/s."""
from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 2 ** 20
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Case:
    op: str           # batch_norm, layer_norm, rms_norm, instance_norm, group_norm
    kind: str         # fwd-train, fwd-eval, fwd, bwd
    shape: tuple
    dtype: str = "float32"
    layout: str = ""  # NCHW, NHWC (channels-last), NCDHW, NC, rows
    groups: int = 0   # group norm only

    @property
    def name(self) -> str:
        return f"{self.op} {self.kind}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in ("bfloat16", "float16") else 4

    @property
    def bytes(self) -> int:
        """The minimal traffic: forward reads x and writes y; backward reads x, dy and writes dx
        (the per-channel / per-feature parameter vectors are ignored)."""
        return (3 if self.kind == "bwd" else 2) * self.numel * self.itemsize

    def label(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.name} {shape} {self.dtype} {self.layout}"


def _batch_cases(shape, layout, dtype="float32"):
    return [Case("batch_norm", kind, shape, dtype, layout) for kind in ("fwd-train", "fwd-eval", "bwd")]


def _layer_cases(shape, dtype="float32", op="layer_norm"):
    return [Case(op, kind, shape, dtype, "rows") for kind in ("fwd", "bwd")]


# Row widths of the layer and RMS norm cases (8192 rows each): attention heads' 64 and 128, where
# per-row overhead dominates, BERT-base's 768, BERT-large's 1024 and a 4096-wide decoder.
ROW_WIDTHS = (64, 128, 768, 1024, 4096)


def _group_cases(shape, groups):
    return [Case("group_norm", kind, shape, "float32", "NCHW", groups) for kind in ("fwd", "bwd")]


@dataclass
class Suite:
    cases: list
    dram_bytes: int = 256 * MIB   # the copy-bandwidth array (each of source and destination)
    cache_bytes: int = 8 * MIB    # the in-cache copy: source + destination = 16 MiB
    overhead_shape: tuple = (16, 32)
    overhead_blocks: tuple = (200, 50)  # blocks of calls timed: (full, quick)


def full_suite() -> Suite:
    cases = (_batch_cases((32, 64, 56, 56), "NCHW") + _batch_cases((32, 64, 56, 56), "NHWC")
             + _batch_cases((64, 256, 28, 28), "NCHW") + _batch_cases((64, 256, 28, 28), "NHWC")
             + _batch_cases((256, 1024), "NC") + _batch_cases((16, 32), "NC")
             + _batch_cases((8, 32, 16, 32, 32), "NCDHW")
             + _batch_cases((32, 64, 56, 56), "NCHW", "bfloat16") + _batch_cases((32, 64, 56, 56), "NCHW", "float16")
             + [c for w in ROW_WIDTHS for op in ("layer_norm", "rms_norm") for c in _layer_cases((8192, w), op=op)]
             + _layer_cases((8192, 1024), "bfloat16") + _layer_cases((8192, 1024), "float16")
             + [Case("instance_norm", "fwd", (16, 64, 64, 64), "float32", "NCHW")]
             + _group_cases((32, 64, 56, 56), 32))
    return Suite(cases)


def tiny_suite() -> Suite:
    """Every op, pass, dtype and layout of the full suite on small shapes: a smoke test."""
    cases = (_batch_cases((4, 8, 6, 6), "NCHW") + _batch_cases((4, 8, 6, 6), "NHWC") + _batch_cases((16, 8), "NC")
             + _batch_cases((2, 4, 3, 4, 5), "NCDHW") + _batch_cases((4, 8, 6, 6), "NCHW", "bfloat16")
             + _batch_cases((4, 8, 6, 6), "NCHW", "float16")
             + _layer_cases((16, 32)) + _layer_cases((16, 32), "bfloat16") + _layer_cases((16, 32), "float16")
             + _layer_cases((16, 32), op="rms_norm")
             + [Case("instance_norm", "fwd", (2, 4, 5, 5), "float32", "NCHW")]
             + _group_cases((2, 8, 4, 4), 4))
    return Suite(cases, dram_bytes=4 * MIB, cache_bytes=1 * MIB, overhead_blocks=(10, 5))


SUITES = {"full": full_suite, "tiny": tiny_suite}
