"""The `bncore` command line: `python -m bncore <command>` (or the `bncore` script)."""
from __future__ import annotations

import argparse
import sys


def _version_text() -> str:
    import bncore

    return f"bncore {bncore.__version__} (C library {bncore._core.version_string()})"


class _VersionAction(argparse.Action):
    """--version: like argparse's own, but imports bncore only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand sets `run`, the function that carries it out."""
    parser = argparse.ArgumentParser(prog="bncore", description="Normalization layers on one C core.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of bncore and of its C library, and exit")
    # build flags for C and C++ programs that link the installed library (like numpy.get_include())
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cflags", action="store_true", help="print the compiler flags: -I<include dir>")
    where.add_argument("--libs", action="store_true",
                       help="print the linker flags: -L<dir> -lbncore and an rpath so the library is found at run time")
    where.add_argument("--cmake-dir", action="store_true",
                       help="print the folder of bncoreConfig.cmake (for -Dbncore_DIR=...)")
    where.add_argument("--pkgconfig-dir", action="store_true", help="print the folder of bncore.pc")
    where.add_argument("--include", action="store_true", help="print the include folder")
    commands = parser.add_subparsers(title="commands", dest="command")

    version = commands.add_parser("version", help="print the versions of bncore and of its C library")
    version.set_defaults(run=_version)

    demo = commands.add_parser(
        "demo", help="train a small MLP on scikit-learn's digits with and without batch norm",
        description="Trains a 64-64-64-10 NumPy MLP on scikit-learn's bundled digits, with and without "
                    "bncore.BatchNorm, at two learning rates, and prints the loss and test accuracy per epoch.")
    demo.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs per run (default 20)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (3), for a smoke test")
    demo.add_argument("--small-batch", action="store_true",
                      help="instead: batch sizes 2 to 32 with batch norm, batch renorm, ghost batch norm, group norm "
                           "and layer norm (mean and spread of the test accuracy over seeds)")
    demo.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the train/test split, the initial weights and the batch order (default 0)")
    demo.add_argument("--plot", default="bncore-demo.png", metavar="FILE",
                      help="PNG of the loss curves, written when matplotlib is installed "
                           "(default: %(default)s in the current directory)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench", help="time bncore against PyTorch and NumPy, and against the machine's copy bandwidth",
        description="Measures the copy bandwidth (DRAM and in-cache), then times batch, layer, RMS, instance "
                    "and group norm (forward and backward, float32, bfloat16 and float16, NCHW and channels-last) in "
                    "bncore, "
                    "PyTorch (when installed) and plain NumPy (bncore.reference at float32), alternating them in "
                    "each repeat, checks every result against bncore.reference in float64, and prints the "
                    "median times, bncore's speed-up over PyTorch (torch time / bncore time), its GB/s and the "
                    "percentage of the copy bandwidth it reaches.")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (same cases and shapes)")
    bench.add_argument("--threads", type=int, default=None, metavar="N",
                       help="threads for bncore and PyTorch (default: bncore's current count)")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="write every number, with machine info and versions, to FILE as JSON")
    bench.add_argument("--plot", default=None, metavar="FILE",
                       help="write a PNG bar chart of the speed-ups over PyTorch (needs matplotlib)")
    bench.add_argument("--suite", default="full", choices=("full", "tiny"), help=argparse.SUPPRESS)
    bench.add_argument("--only", default=None, metavar="WORDS",
                       help="time only the cases whose label (op, pass, shape, dtype, layout, as the table prints "
                            "them) contains every word of WORDS, e.g. --only 'layer_norm bwd 768'; the fused "
                            "epilogue and the distributed case are then skipped")
    bench.add_argument("--no-torch", action="store_true", help=argparse.SUPPRESS)
    bench.add_argument("--no-distributed", action="store_true",
                       help="skip the distributed case (2 processes, synchronized batch norm)")
    bench.set_defaults(run=_bench)
    return parser


def _version(args) -> int:
    print(_version_text())
    return 0


def _demo(args) -> int:
    # imported here so that other commands do not pay for (or need) the demo's imports
    if args.small_batch:
        from bncore import demo_small

        return demo_small.main(args)
    from bncore import demo

    return demo.main(args)


def _bench(args) -> int:
    # imported here so that other commands do not pay for the bench's imports
    from bncore import bench

    return bench.main(args)


def _build_flag(args):
    """The text a build-flag option asks for, or None when none was given."""
    import os

    import bncore

    libdir = os.path.dirname(bncore.get_library())
    if args.cflags:
        return f"-I{bncore.get_include()}"
    if args.libs:
        return f"-L{libdir} -lbncore -Wl,-rpath,{libdir}"
    if args.cmake_dir:
        return bncore.get_cmake_dir()
    if args.pkgconfig_dir:
        return bncore.get_pkgconfig_dir()
    if args.include:
        return bncore.get_include()
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flag = _build_flag(args)
    if flag is not None:
        print(flag)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
