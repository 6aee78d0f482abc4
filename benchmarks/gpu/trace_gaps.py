"""Where the device idles between kernels, from a Chrome trace of profile_steps.py.

Reads the trace's device events (kernels, copies, memsets), merges their busy intervals, and
prints the idle time per step and the largest gaps with the events on either side. A step starts at
each launch of `--step-kernel` (a name fragment of the first kernel of a decode step).

usage: python benchmarks/gpu/trace_gaps.py TRACE.json [--step-kernel decode_inputs] [--top 12]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics


def device_events(path: str) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every kernel, copy and memset, by start time."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(events)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--step-kernel", default="decode_inputs")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    events = device_events(args.trace)
    starts = [s for s, _, name in events if args.step_kernel in name]
    gaps = []  # (gap us, before, after, step index)
    busy_end, before = events[0][1], events[0][2]
    for start, end, name in events[1:]:
        if start > busy_end:
            step = sum(1 for s in starts if s <= start) - 1
            gaps.append((start - busy_end, before, name, step))
        if end > busy_end:
            busy_end, before = end, name
    steps = range(1, len(starts) - 1)  # whole steps only
    idle = [sum(g for g, _, _, k in gaps if k == i) for i in steps]
    period = [starts[i + 1] - starts[i] for i in steps]
    print(f"{len(starts)} steps; step period median {statistics.median(period):.1f} us, "
          f"idle median {statistics.median(idle):.1f} us a step")
    # The steady gaps: per (before, after) pair, the median over the steps where it occurs.
    by_pair: dict[tuple[str, str], list[float]] = {}
    for g, b, a, k in gaps:
        if k in steps:
            by_pair.setdefault((b[:60], a[:60]), []).append(g)
    rows = sorted(((sum(v) / len(steps), statistics.median(v), len(v), pair) for pair, v in by_pair.items()),
                  reverse=True)
    print("idle us/step  median gap  count  before -> after")
    for per_step, med, n, (b, a) in rows[:args.top]:
        print(f"{per_step:12.2f}  {med:10.2f}  {n:5d}  {b} -> {a}")


if __name__ == "__main__":
    main()
