"""The C ABI as an installed product: exported symbols, build flags, the CMake package,
pkg-config, the examples in docs/examples, and cimport from another Cython project."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import bncore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
HEADER = Path(bncore.get_include()) / "bncore" / "bncore.h"


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed on this machine, so this build check cannot run")


def _cli(flag) -> str:
    return _run([sys.executable, "-m", "bncore", flag]).stdout.strip()


def declared_functions() -> set[str]:
    text = HEADER.read_text()
    return set(re.findall(r"BN_API\s+[\w\s\*]*?\b(bn_\w+)\s*\(", text))


def test_installed_header_is_the_source_header():
    assert HEADER.read_text() == (ROOT / "src" / "c" / "include" / "bncore" / "bncore.h").read_text()
    assert (Path(bncore.get_include()) / "dlpack" / "dlpack.h").is_file()
    assert (Path(bncore.get_include()) / "bncore" / "version.h").is_file()


def test_exported_symbols_are_exactly_the_header_functions():
    _need("nm")
    out = _run(["nm", "-D", "--defined-only", bncore.get_library()]).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[1:2] in (["T"], ["i"])}
    declared = declared_functions()
    assert len(declared) >= 20, declared
    assert exported == declared, (f"exported but not declared: {sorted(exported - declared)}; "
                                  f"declared but not exported: {sorted(declared - exported)}")


def test_version_agrees_everywhere():
    from importlib.metadata import version

    text = (Path(bncore.get_include()) / "bncore" / "version.h").read_text()
    macro = re.search(r'#define BN_VERSION_STRING "([^"]+)"', text).group(1)
    assert bncore.__version__ == bncore._core.version_string() == version("bncore") == macro
    major, minor, patch = (int(p) for p in macro.split("."))
    assert bncore._core.version() == major * 10000 + minor * 100 + patch


def test_cli_build_flags_point_at_real_files():
    assert _cli("--cflags") == f"-I{bncore.get_include()}"
    libs = _cli("--libs").split()
    libdir = os.path.dirname(bncore.get_library())
    assert libs == [f"-L{libdir}", "-lbncore", f"-Wl,-rpath,{libdir}"]
    assert (Path(_cli("--cmake-dir")) / "bncoreConfig.cmake").is_file()
    assert (Path(_cli("--pkgconfig-dir")) / "bncore.pc").is_file()


def _check_example_output(exe: Path, expect: str):
    # no LD_LIBRARY_PATH: the rpath (or CMake's) must find the library
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = _run([str(exe)], env=env).stdout
    assert expect in out, out


def test_examples_build_with_cflags_and_libs(tmp_path):
    _need("cc")
    _need("c++")
    cflags, libs = _cli("--cflags").split(), _cli("--libs").split()
    _run(["cc", "-std=c11", "-Wall", "-Werror", str(EXAMPLES / "train_step.c"), *cflags, *libs, "-lm", "-o",
          str(tmp_path / "train_step")])
    _run(["c++", "-std=c++17", "-Wall", "-Werror", str(EXAMPLES / "train_step.cpp"), *cflags, *libs, "-o",
          str(tmp_path / "train_step_cpp")])
    _check_example_output(tmp_path / "train_step", "OK: bncore agrees with the reference")
    _check_example_output(tmp_path / "train_step_cpp", "from C++")


def test_examples_build_with_cmake_package(tmp_path):
    _need("cmake")
    _need("c++")
    build = tmp_path / "build"
    _run(["cmake", "-S", str(EXAMPLES), "-B", str(build), f"-Dbncore_DIR={_cli('--cmake-dir')}",
          "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build)])
    _check_example_output(build / "train_step", "OK: bncore agrees with the reference")
    _check_example_output(build / "train_step_cpp", "from C++")


def test_pkg_config_file_links(tmp_path):
    _need("pkg-config")
    _need("cc")
    env = dict(os.environ, PKG_CONFIG_PATH=_cli("--pkgconfig-dir"))
    flags = _run(["pkg-config", "--cflags", "--libs", "bncore"], env=env).stdout.split()
    _run(["cc", str(EXAMPLES / "train_step.c"), *flags, "-lm", "-o", str(tmp_path / "t")])
    _check_example_output(tmp_path / "t", "OK")


CIMPORT_PYX = """
from bncore cimport capi

def version():
    return capi.bn_version_string().decode()

def invalid_status_text():
    return capi.bn_status_string(capi.BN_STATUS_INVALID_ARGUMENT).decode()
"""


def test_another_cython_module_can_cimport_the_c_api(tmp_path):
    cython = pytest.importorskip("Cython", reason="Cython is needed to build a module that cimports bncore")
    _need("cc")
    pxd_root = Path(bncore.get_cython_include())
    assert (pxd_root / "bncore" / "capi.pxd").is_file()
    src = tmp_path / "uses_bncore.pyx"
    src.write_text(CIMPORT_PYX)
    c_file = tmp_path / "uses_bncore.c"
    _run([sys.executable, "-m", "cython", "-3", "-I", str(pxd_root), str(src), "-o", str(c_file)])
    ext = tmp_path / ("uses_bncore" + sysconfig.get_config_var("EXT_SUFFIX"))
    libdir = os.path.dirname(bncore.get_library())
    _run(["cc", "-shared", "-fPIC", "-O1", str(c_file), f"-I{sysconfig.get_paths()['include']}",
          f"-I{bncore.get_include()}", f"-L{libdir}", "-lbncore", f"-Wl,-rpath,{libdir}", "-o", str(ext)])
    code = ("import uses_bncore, bncore; "
            "assert uses_bncore.version() == bncore.__version__; "
            "print(uses_bncore.invalid_status_text())")
    out = _run([sys.executable, "-c", code], cwd=tmp_path).stdout.strip()
    assert out == bncore._core.status_string(1) == "invalid argument"
    assert cython.__version__
