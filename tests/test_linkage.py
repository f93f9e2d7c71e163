"""The compiled modules share the process's C++ runtime instead of carrying their own copy.

A module linked with a static libstdc++ whose symbols stay exported mixes two runtimes in one process: on the GPU
image of 2026-11 every bad-input error that formatted a number (a shape in the message) crashed Python with a
segfault inside std::ostream. Here: the module needs the shared libstdc++, and std::ostream / std::locale /
__cxa_throw as seen from the module resolve to that library, not to code inside the module.
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
    paths = []
    for name in ("_C", "_cuda_emulation"):
        try:
            module = __import__(f"mtlfast.{name}", fromlist=[name])
        except ImportError:
            continue
        paths.append(Path(module.__file__).resolve())
    if not paths:
        pytest.skip("no compiled mtlfast module in this install")
    return paths


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
        library = ctypes.CDLL(str(path))  # already loaded by the import: the same handle
        # dlsym on the module's handle searches the module first, then its dependencies.
        defined_in = _defining_file(library, symbol)
        assert defined_in != path, f"{path.name} defines and exports {symbol}: a private copy of the C++ runtime"
        assert "libstdc++" in defined_in.name, f"{symbol} of {path.name} resolves to {defined_in}, not libstdc++"


def test_modules_need_the_shared_cxx_runtime():
    for path in _modules():
        needed = _needed_libraries(path)
        assert any(name.startswith("libstdc++.so") for name in needed), f"{path.name} needs {needed}"


def _needed_libraries(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object, read from its dynamic section."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF"
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    section_size, section_count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * section_size)
                for i in range(section_count)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strings = sections[dynamic[6]]  # sh_link: its string table
    needed = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strings[4] + value
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed
