"""Runs a module (default: the throughput benchmark) and logs every Triton compile as it happens.

A compile inside a timed run (a kernel variant the warm-up did not need) costs ~0.5-1.5 s of the
run. Usage: python benchmarks/gpu/compile_watch.py [--module pagellm.benchmarks.throughput] ARGS...
"""

from __future__ import annotations

import runpy
import sys
import time

import triton

START = time.perf_counter()


def log_compile(*args, **kwargs) -> bool:
    text = str(kwargs.get("repr", ""))
    name, _, rest = text.partition("(")
    print(f"[compile +{time.perf_counter() - START:7.2f} s] {name} ({rest[:600]}", file=sys.stderr, flush=True)
    return False  # go on and compile


def main() -> None:
    argv = sys.argv[1:]
    module = "pagellm.benchmarks.throughput"
    if argv[:1] == ["--module"]:
        module, argv = argv[1], argv[2:]
    triton.knobs.runtime.jit_cache_hook = log_compile
    sys.argv = [module] + argv
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
