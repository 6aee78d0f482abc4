"""Builds the CPU kernels' C sources at first use, once per machine, into the user cache.

Each library is compiled with the system's C compiler (gcc, -O3 -march=native -fopenmp) under a
name keyed by its source, the shared headers (bf16.h) and the CPU's flags, so an edit or another CPU means a new build; the
OpenMP runtime it links is the one PyTorch has already loaded. Where building fails, `load_library`
returns None and the caller keeps its portable path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _cache_dir() -> Path:
    root = os.environ.get("PAGELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagellm")
    return Path(root) / "cpu_kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not load on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build(source: Path, target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", str(source), "-o", str(built), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: a concurrent process sees the old file or the whole new one


@functools.lru_cache(maxsize=None)
def load_library(source_name: str, switch: str, signatures: tuple = ()) -> ctypes.CDLL | None:
    """The library built from kernels/cpu/<source_name>.c, or None where the environment variable
    `switch` is "0", the OS is not Linux, or the build fails (logged once). `signatures`:
    (function name, restype, argtypes tuple) for each entry point, set on the loaded library."""
    if os.environ.get(switch, "1") == "0" or platform.system() != "Linux":
        return None
    source = Path(__file__).with_name(f"{source_name}.c")
    # The key covers the shared headers too: editing one rebuilds every library.
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source_name}-{key}.so"
    try:
        if not target.exists():
            _build(source, target)
        lib = ctypes.CDLL(str(target))
        for name, restype, argtypes in signatures:
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = list(argtypes)
        return lib
    except (OSError, RuntimeError, AttributeError) as e:
        logger.warning("CPU kernel %s unavailable, using the PyTorch path: %s", source_name, e)
        return None
