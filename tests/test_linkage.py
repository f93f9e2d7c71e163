"""The compiled modules export no C++ runtime of their own.

A module linked with a static libstdc++ whose symbols stay exported mixes two runtimes in one process: on the GPU
image of 2026-11 (whose g++ links libstdc++ statically) nearly every bad-input error crashed Python with a segfault
inside std::ostream, where the error message formatted a number. Looked up through the module (dlsym searches the
module first, then its dependencies), std::ostream, std::locale and __cxa_throw must resolve to the process's
libstdc++, not to a copy inside the module: CMakeLists.txt links with --exclude-libs,ALL.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

import mtlfast

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic linking (Linux) only")

# std::ostream::_M_insert<long> (every `out << some_long`), std::locale::classic(), and the exception entry point.
RUNTIME_SYMBOLS = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale7classicEv", "__cxa_throw")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _modules() -> list[Path]:
    # Only _C: loading mtlfast._cuda_emulation (same link options) would register the emulated CUDA glue for the
    # CPU dispatch key in this process, and the CPU-semantics tests that run after this file would see it.
    try:
        from mtlfast import _C
    except ImportError:
        pytest.skip("no compiled mtlfast._C in this install")
    return [Path(_C.__file__).resolve()]


def _defining_file(library: ctypes.CDLL, symbol: str) -> Path:
    address = ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    info = _DlInfo()
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    assert dladdr(address, ctypes.byref(info)), f"dladdr found no library for {symbol}"
    return Path(os.fsdecode(info.dli_fname)).resolve()


@pytest.mark.parametrize("symbol", RUNTIME_SYMBOLS)
def test_cxx_runtime_symbols_come_from_the_shared_library(symbol):
    for path in _modules():
        library = ctypes.CDLL(str(path))  # loaded by the import already: the same handle
        # dlsym on the module's handle searches the module first, then its dependencies.
        defined_in = _defining_file(library, symbol)
        assert defined_in != path, f"{path.name} defines and exports {symbol}: a private copy of the C++ runtime"
        assert "libstdc++" in defined_in.name, f"{symbol} of {path.name} resolves to {defined_in}, not libstdc++"
