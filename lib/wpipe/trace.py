"""Per-rank timeline of a run: when each op computed and how long it was blocked.

With `PipelineConfig.trace` on, the engine records one event per op's compute (named
exactly `str(op)`: `2F3`, `1B0`, `2U`), the recomputation part of a backward as
`recompute 1B0`, the launch of an update's all-reduce as `reduce 2U`, and every blocking
wait as its own event whose name starts with `wait` (`wait recv 1F3` = the output of op
1F3 from another rank, `wait allreduce 2U`, `wait sends`). Each train() call is one
enclosing `train` event (category "call"). Off, the recorder costs one attribute test per
op. The names are written with `span_name` and read back with `parse_span` only.

`write_trace` stores the events of every rank in Chrome trace-event format (loadable in
Perfetto or chrome://tracing): `{"traceEvents": [...], "otherData": {...}}`, `ph: "X"`
events, `pid` = global rank, `ts` and `dur` in microseconds from a common origin
(`common_origin`: exact when the ranks share a host, within a barrier's skew otherwise).
`otherData` holds the configuration fields that fix the schedule.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .files import write_atomic
from .schedule.methods import Op, parse_op

CALL, COMPUTE, WAIT = "call", "compute", "wait"          # event categories
TRAIN = "train"                                         # the CALL event of a train() call
RECOMPUTE, REDUCE = "recompute", "reduce"               # COMPUTE prefixes
WAIT_RECV, WAIT_ALLREDUCE, WAIT_SENDS = "wait recv", "wait allreduce", "wait sends"   # WAIT names
PREFIXES = (RECOMPUTE, REDUCE, WAIT_RECV, WAIT_ALLREDUCE)


def span_name(prefix: str, op) -> str:
    """The name of an event about op `op` (an Op or its spelling): `recompute 2B3`."""
    return f"{prefix} {op}"


def parse_span(name: str) -> tuple[str, Op | None]:
    """(prefix, op) of an event name: ("", 2F3) for an op's own compute, ("recompute",
    2B3), ("wait recv", 1F3), ("wait sends", None), ("train", None). ValueError otherwise."""
    if name in (WAIT_SENDS, TRAIN):
        return name, None
    prefix, _, token = name.rpartition(" ")
    if prefix and prefix not in PREFIXES:
        raise ValueError(f"unknown trace event name {name!r}")
    return prefix, parse_op(token)


class Recorder:
    """Events of one rank. Times are perf_counter seconds from `origin`.

    How a span is timed (`time_on`): on the host by default; on a GPU by events recorded
    on the current stream at both ends (what the device did, not when the host launched
    it: a compute span holds the op's kernels, a wait the time the stream was held), read
    once per train() call (`resolve`) and placed on the host clock from the call's first
    event; or, with `synchronize` (probe mode), on the host between two waits for the GPU."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.synchronize = False
        self.clock = None                # a DeviceClock when spans are timed by GPU events
        self.origin = time.perf_counter()
        self.events: list[tuple[str, str, float, float, dict | None]] = []   # (cat, name, start, end, args)

    def time_on(self, device, synchronize: bool = False) -> None:
        """Time spans on `device` (a torch.device): by its events on CUDA, unless
        `synchronize`; on the host otherwise."""
        if self.enabled and device.type == "cuda":
            self.synchronize = synchronize
            self.clock = None if synchronize else DeviceClock()

    def set_origin(self, origin: float) -> None:
        """Time zero, in this process's perf_counter seconds."""
        self.origin = origin

    def span(self, category: str, name, args: dict | None = None):
        """Context manager recording one event; `name` may be any object (formatted
        with str() only when recording)."""
        if not self.enabled:
            return nullcontext()
        return self._span(category, name, args)

    @contextmanager
    def _span(self, category, name, args):
        self._synchronize()
        start = self.clock.mark() if self.clock else time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            end = self.clock.mark() if self.clock else time.perf_counter()
            self.events.append((category, str(name), start, end, args))

    def resolve(self) -> None:
        """Turn the GPU events recorded since the last call into host seconds (one wait for
        the last of them); nothing to do when spans are timed on the host."""
        if self.clock:
            self.events = self.clock.resolve(self.events)

    def _synchronize(self) -> None:
        if self.synchronize:
            import torch
            torch.cuda.synchronize()

    def chrome_events(self, rank: int, label: str | None = None) -> list[dict]:
        """The events in Chrome trace-event form as global rank `rank`'s (the pid), a
        process-name record first, then by start time."""
        out = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": label or f"rank {rank}"}}]
        for category, name, start, end, args in sorted(self.events, key=lambda e: e[2]):
            event = {"name": name, "cat": category, "ph": "X", "pid": rank, "tid": 0,
                     "ts": round((start - self.origin) * 1e6, 3), "dur": round((end - start) * 1e6, 3)}
            if args:
                event["args"] = args
            out.append(event)
        return out


class DeviceClock:
    """Marks on the current CUDA stream (`mark`: a timing event), converted to host seconds
    by `resolve`: the first mark since the last resolve stands for the host time at which
    it was recorded (the device runs it at once when idle, as at the start of a call), and
    every other mark for that time plus the device time elapsed between the two. `event`
    makes an event (torch.cuda.Event by default)."""

    def __init__(self, event=None):
        self.event = event or _timing_event
        self.reference = None            # (first event since resolve, host seconds then)

    def mark(self):
        event = self.event()
        event.record()
        if self.reference is None:
            self.reference = (event, time.perf_counter())
        return event

    def resolve(self, events: list[tuple]) -> list[tuple]:
        """`events` with every mark replaced by its host seconds."""
        if self.reference is None:
            return events
        first, host = self.reference
        marks = [e for _, _, start, end, _ in events for e in (start, end) if not isinstance(e, float)]
        marks[-1].synchronize()

        def seconds(mark):
            return mark if isinstance(mark, float) else host + first.elapsed_time(mark) / 1e3
        self.reference = None
        return [(c, n, seconds(start), seconds(end), a) for c, n, start, end, a in events]


def _timing_event():
    import torch
    return torch.cuda.Event(enable_timing=True)


def common_origin() -> float:
    """A time zero for every rank's events (a collective: call on every rank). Ranks on one
    host share one monotonic clock, so they take rank 0's reading; ranks on several hosts
    take their own reading right after a barrier, which leaves the barrier's release skew
    (up to a few milliseconds) between hosts."""
    import socket

    import torch.distributed as dist

    dist.barrier()
    now = time.perf_counter()
    readings = [None] * dist.get_world_size()
    dist.all_gather_object(readings, (socket.gethostname(), now))
    return readings[0][1] if len({host for host, _ in readings}) == 1 else now


def schedule_fields(cfg) -> dict:
    """The configuration fields a trace needs to rebuild its schedule."""
    return {"method": cfg.method, "pipeline_depth": cfg.pipeline_depth, "data_parallel": cfg.data_parallel,
            "micro_batches_per_update": cfg.period, "rank_layout": cfg.rank_layout,
            "recompute": cfg.recompute}


def write_trace(path, events_per_rank: list[list[dict]], cfg) -> Path:
    """Write every rank's events (and the schedule's fields of `cfg`) to `path`, atomically."""
    document = {"traceEvents": [e for events in events_per_rank for e in events],
                "displayTimeUnit": "ms", "otherData": schedule_fields(cfg)}
    return write_atomic(path, json.dumps(document))


def load_trace(path) -> dict:
    """Read a trace.json (or RUN_DIR/trace.json) written by `write_trace`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected a run folder holding trace.json "
                                f"(written with --trace true) or a trace.json file")
    if path.is_dir():
        path = path / "trace.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run with --trace true to write it")
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "traceEvents" not in document:
        raise ValueError(f"{path}: not a trace written by wpipe (no traceEvents)")
    return document


def timeline_summary(events: list[dict]) -> list[dict]:
    """Per rank (ordered by pid): busy_s (compute), wait_s (blocked on communication),
    window_s and bubble_fraction = 1 - busy_s / window_s, over the events inside train()
    calls. window_s sums, over calls, the time from the earliest event start to the latest
    event end of the k-th call of every rank (a trace without calls is one call). Raises
    ValueError when the ranks traced different numbers of calls."""
    spans = [e for e in events if e.get("ph") == "X"]
    ranks = sorted({e["pid"] for e in spans})
    calls = {r: sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e["pid"] == r and e["cat"] == CALL)
             or [(float("-inf"), float("inf"))] for r in ranks}
    if len({len(c) for c in calls.values()}) > 1:
        raise ValueError(f"ranks traced different numbers of train() calls: { {r: len(c) for r, c in calls.items()} }")
    inside = {r: [[] for _ in calls[r]] for r in ranks}     # per rank, per call: its events
    for e in spans:
        k = next((k for k, (a, b) in enumerate(calls[e["pid"]]) if a <= e["ts"] <= b), None)
        if e["cat"] != CALL and k is not None:
            inside[e["pid"]][k].append(e)
    window = 0.0
    for k in range(len(calls[ranks[0]]) if ranks else 0):
        members = [e for r in ranks for e in inside[r][k]]
        if members:
            window += (max(e["ts"] + e["dur"] for e in members) - min(e["ts"] for e in members)) / 1e6
    out = []
    for rank in ranks:
        mine = [e for call in inside[rank] for e in call]
        busy = sum(e["dur"] for e in mine if e["cat"] == COMPUTE) / 1e6
        out.append({"rank": rank, "busy_s": busy, "wait_s": sum(e["dur"] for e in mine if e["cat"] == WAIT) / 1e6,
                    "window_s": window, "bubble_fraction": 1 - busy / window if window else None})
    return out
