"""What the engine needs of the ranks around it (`Transport`), and the real links (`Links`):
point-to-point transfer of tensor tuples between two ranks, with timeouts.

`Transport` is the one protocol the engine talks to: where this rank sits (`place`), the
point-to-point messages of the schedule (`expect`, `send`, `recv`, `arrived`, `finish`),
the data-parallel gradient mean (`mean`, None without replicas) and the fp16 overflow
agreement (`agreement`). `Links` implements it over process groups
(distributed.connect makes them); `loopback.Loopback` implements it without peers, for
probe mode.

A message is a tuple of tensors (a partition's outputs, or the gradients of its inputs)
plus a key naming it (`("F", 2, 3)` = the output of partition 2's forward of micro-batch
3). The messages of one partition and kind form a *stream* (`("F", 2)`: partition 2's
outputs, in micro-batch order). Each stream has process groups of its own
(distributed.create_groups), so it is a FIFO that both ends handle in the same order.

A stream's metadata (dtypes, shapes, gradient flags) is sent once and again only when it
changes (a last, smaller batch). On the wire, per message and in this order:

1. a header, 4 int64 on the control group (gloo, CPU): kind, partition, micro-batch and the
   length of the metadata that follows (0: the stream's metadata is unchanged);
2. when the metadata changed and the receiver already knew an older one: filler tensors of
   the old shapes (they fill the receives posted ahead, see below), then
3. the metadata, when its length is non-zero;
4. the tensors, on the data group (the point-to-point backend: NCCL tensors live on the
   GPU; with gloo, CUDA tensors are staged through pinned CPU buffers, `stage`).

Tensors travel as the `wire` casts them (wire.Wire: float32/float64 in fp16 or bf16
when wire_dtype is set) and are cast back on arrival: the metadata holds both dtypes.

Receives are posted ahead where that is safe. The engine tells its links, per call, the
keys each stream will carry (`Links.expect`; they follow from the schedule). Each incoming
stream keeps the receive of its next message's header posted (gloo, on the CPU: a posted
receive there holds nothing). Its tensors (`posting`):

* `ahead` (gloo data groups): posted with the stream's known metadata as soon as the
  previous message was taken, so that a message travels while the receiver still
  computes, and taking it is one wait rather than a header round trip and then a second
  wait. The sender mirrors what the receiver knows, so it sends the filler exactly when
  the receiver posted receives of the old shapes.
* `taken` (NCCL, and nccl_emulated): posted when the op that needs them is about to run,
  after its header. An NCCL receive is a kernel that waits on the GPU for its data, and a
  device-wide synchronisation (the caching allocator freeing memory, for one) waits for
  every kernel, so a receive posted ahead may hold the host where it was posted, and the
  message it waits for may need what this rank has yet to do (NCCL's "Using multiple NCCL
  communicators concurrently"); posted for the op about to run, it needs only what ran
  before. No receive of old shapes is ever posted, so no filler is sent. On a GPU the host
  runs ahead of the device: the receive is still queued before the previous op's kernels
  end, so the message travels while they run.

`schedule.comms` replays these rules (`rules`, which the engine hands to check_schedule)
and proves every schedule free of deadlock under them, NCCL's communicator creation
included: each data group (and data-parallel group) is used once at start-up, in one
global order (`warm_up`), so that no first message waits for its communicator's creation.

Every wait has a timeout and fails with `CommError` naming both ranks, the message and
the likely cause. Tensors on the GPU (an NCCL data group) are waited for by the compute
stream, not the host (a host wait with a timeout would drain the device at every
message): their deadlines go to a `watchdog.Watchdog`, checked at every send and receive.
Headers and metadata travel on the CPU and are waited for on the host, with the timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from ..errors import CommError
from ..schedule.comms import Rules
from ..trace import WAIT, WAIT_RECV, span_name
from .precision import Agreement, LossScaler
from .updates import GradientMean
from .watchdog import Watchdog
from .wire import Wire, decode_metadata, encode_metadata

KIND_CODES = {"F": 0, "B": 1}
KINDS = {code: kind for kind, code in KIND_CODES.items()}

Key = tuple[str, int, int]   # (kind, partition, micro-batch): the output or input gradients of an op


@dataclass(frozen=True)
class Place:
    """Where a rank sits: its global rank, its data-parallel replica and pipeline device
    position, and the device it computes on."""
    rank: int
    replica: int
    device_index: int
    device: torch.device


class Transport(Protocol):
    place: Place
    p2p_backend: str                 # how tensors travel (reports): nccl, gloo, nccl_emulated, loopback
    mean: GradientMean | None        # the mean of gradients over the replicas, or None
    synchronize_ops: bool            # time every op to the device's end (probe mode)
    rules: Rules | None              # what its communication is proven under (schedule.comms), or None

    def expect(self, keys: list[Key]) -> None:
        """The keys this rank will receive in the coming call, each stream's in its order."""

    def send(self, key: Key, tensors: tuple[torch.Tensor, ...]) -> None:
        """Start sending `tensors` (the result of op `key`) to the rank that needs them."""

    def recv(self, key: Key, waiter: str) -> tuple[torch.Tensor, ...]:
        """The tensors of message `key`; `waiter` names the op that needs them (errors)."""

    def arrived(self, key: Key) -> bool:
        """Whether `recv(key)` would return without waiting."""

    def finish(self, waiter: str = "end of train") -> None:
        """Wait until every send has left (a sender keeps its tensors until then)."""

    def agreement(self, scaler: LossScaler) -> Agreement:
        """The fp16 loss scaler shared by every rank (a collective: call on every rank)."""


class _Posted:
    """The receives posted for the next message of one incoming stream."""

    def __init__(self, key, header, header_work, tensors, works):
        self.key, self.header, self.header_work = key, header, header_work
        self.tensors, self.works = tensors, works     # None when the stream's metadata is unknown
        self.time = time.perf_counter()                # when they were posted


class Links:
    """This rank's ends of its streams (a `Transport`). `streams[(kind, partition)]` =
    (source rank, destination rank, control group, data group), as in distributed.Groups,
    in `Topology.streams()` order. Received tensors land on `place.device`; with `stage`,
    CUDA tensors travel through pinned CPU buffers (gloo data groups cannot carry CUDA
    tensors point to point). `wire` casts them on the way. `posting`: when the receives of
    a message's tensors are posted (the module docstring); `rules`: what the engine proves
    the schedule under."""

    synchronize_ops = False

    def __init__(self, place: Place, streams: dict, timeout_s: float, trace=None, wire: Wire | None = None,
                 stage: bool = False, p2p_backend: str = "gloo", mean: GradientMean | None = None,
                 posting: str = "ahead", rules: Rules | None = None, watchdog: Watchdog | None = None):
        self.place, self.rank, self.device = place, place.rank, place.device
        self.streams = streams
        self.p2p_backend, self.mean = p2p_backend, mean
        self.posting, self.rules = posting, rules
        self.wire = wire or Wire(None)
        self.stage = stage
        self.wire_device = torch.device("cpu") if stage else place.device
        self.timeout = timedelta(seconds=timeout_s)
        self.watchdog = watchdog or Watchdog(place.rank, timeout_s)
        self.on_device = self.wire_device.type == "cuda"   # the data groups are NCCL's
        self.trace = trace
        self.metadata: dict[tuple, list] = {}            # stream -> metadata both ends know
        self.expected: dict[tuple, list[tuple]] = {}     # incoming stream -> keys still to come
        self.posted: dict[tuple, _Posted] = {}           # incoming stream -> receives of its next message
        self.early: dict[tuple, tuple[torch.Tensor, ...]] = {}   # arrived before asked for
        self.in_flight: list[tuple[object, object, str]] = []    # (work, tensors kept alive, what)

    def agreement(self, scaler: LossScaler) -> Agreement:
        return Agreement(scaler, self.rank, self.timeout.total_seconds())

    def expect(self, keys: list[tuple]) -> None:
        """Set the keys this rank will receive in the coming call, each stream's in the
        order its sender sends them, and post the receives of each stream's first message."""
        leftover = [s for s, k in self.expected.items() if k] + list(self.posted)
        if leftover:
            raise CommError(f"rank {self.rank}: messages of streams {sorted(set(leftover))} were "
                            f"expected but never received in the last call")
        self.expected = {}
        for key in keys:
            self.expected.setdefault(key[:2], []).append(key)
        for stream in self.expected:
            self._post_next(stream)

    def send(self, key: tuple[str, int, int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Start sending `tensors` (detached, made contiguous) on the stream of `key`."""
        self.watchdog.check()
        stream = key[:2]
        _, dst, control, data = self.streams[stream]
        # The gradient flags tell the receiver which inputs are leaves to differentiate.
        flags = [t.requires_grad for t in tensors]
        tensors, restore = self.wire.encode(tuple(t.detach() for t in tensors))
        tensors = tuple(self._to_wire(t) for t in tensors)
        meta = encode_metadata(tensors, restore, flags + [False] * (len(tensors) - len(flags)))
        known = self.metadata.get(stream)
        changed = known != meta
        header = torch.tensor([KIND_CODES[key[0]], key[1], key[2], len(meta) if changed else 0])
        what = f"{_name(key)} to rank {dst}"
        self.in_flight.append((dist.isend(header, dst, group=control), header, what))
        if changed:
            if known is not None and self.posting == "ahead":   # the receiver posted receives of the old shapes
                self._send_data(stream, tuple(torch.empty(shape, dtype=dtype, device=self.wire_device)
                                              for dtype, _, _, shape in decode_metadata(known)), what, _op(key))
            meta_tensor = torch.tensor(meta)
            self.in_flight.append((dist.isend(meta_tensor, dst, group=control), meta_tensor, what))
            self.metadata[stream] = meta
        self._send_data(stream, tensors, what, _op(key))
        self._reap()

    def _send_data(self, stream, tensors: tuple[torch.Tensor, ...], what: str, waiter: str) -> None:
        """Start sending `tensors` on the data group of `stream` (`waiter`: the op sending)."""
        _, dst, _, data = self.streams[stream]
        for t in tensors:
            self.in_flight.append((dist.isend(t, dst, group=data), t, what))

    def warm_up(self) -> None:
        """Use every stream's data group once, in `streams` order (Topology.streams(): the
        same on every rank), by one small message from its source to its destination: a
        communicator created lazily (NCCL's) is then created here, every rank meeting its
        peers in one global order, which cannot deadlock, rather than at a first message
        that meets its receiver only when the receiver's op takes it. A collective over the
        ranks of each stream."""
        for stream, (src, dst, _, _) in self.streams.items():
            token = torch.zeros(1, device=self.wire_device)
            what = f"the warm-up message of stream {stream[0]}{stream[1]}"
            if self.rank == src:
                self._send_data(stream, (token,), f"{what} to rank {dst}", "start-up")
                self.finish("start-up")
            else:
                (token,), (work,) = self._recv_data(stream, [(token.dtype, None, False, (1,))], "start-up")
                self._wait(work, src, None, "start-up", what)

    def recv(self, key: tuple[str, int, int], waiter: str) -> tuple[torch.Tensor, ...]:
        """Receive the message `key`; `waiter` names the op that needs it, for errors and
        the trace. Received floats flagged as needing gradients come back as leaves with
        requires_grad=True."""
        self.watchdog.check()
        if key in self.early:
            return self.early.pop(key)
        if self.trace is None or not self.trace.enabled:
            return self._recv(key, waiter)
        posted = self.posted.get(key[:2])
        args = {"peer": self.streams[key[:2]][0], "op": waiter,
                "posted_us": round((posted.time - self.trace.origin) * 1e6, 1) if posted else None}
        with self.trace.span(WAIT, span_name(WAIT_RECV, _op(key)), args):
            tensors = self._recv(key, waiter)
        args["bytes"] = sum(t.numel() * t.element_size() for t in tensors)
        return tensors

    def arrived(self, key: tuple[str, int, int]) -> bool:
        """Whether `recv(key)` would return without waiting."""
        if key in self.early:
            return True
        posted = self.posted.get(key[:2])
        return (posted is not None and posted.key == key and posted.works is not None
                and posted.header_work.is_completed() and all(w.is_completed() for w in posted.works))

    def _recv(self, key, waiter):
        while True:
            got, tensors = self._complete(key, waiter)
            if got == key:
                return tensors
            self.early[got] = tensors

    def _post_next(self, stream) -> None:
        """Post the receives of the next message expected on `stream`, if any."""
        if not self.expected.get(stream):
            return
        key = self.expected[stream].pop(0)
        src, _, control, _ = self.streams[stream]
        header = torch.empty(4, dtype=torch.int64)
        header_work = dist.irecv(header, src, group=control)
        tensors = works = None
        if stream in self.metadata and self.posting == "ahead":
            tensors, works = self._recv_data(stream, decode_metadata(self.metadata[stream]), _op(key))
        self.posted[stream] = _Posted(key, header, header_work, tensors, works)

    def _recv_data(self, stream, meta: list, waiter: str) -> tuple[list[torch.Tensor], list]:
        """Post the receives of tensors of metadata `meta` on the data group of `stream`
        (`waiter`: the op that will take them); return the tensors and their works."""
        src, _, _, data = self.streams[stream]
        pin = self.stage and self.device.type == "cuda"
        tensors = [torch.empty(shape, dtype=dtype, device=self.wire_device, pin_memory=pin)
                   for dtype, _, _, shape in meta]
        return tensors, [dist.irecv(t, src, group=data) for t in tensors]

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as the data group carries it: contiguous, in a pinned CPU buffer when staged."""
        t = t.contiguous()
        if self.stage and t.is_cuda:
            t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return t

    def _complete(self, wanted, waiter):
        """Wait for the next message on the stream of `wanted` (its receives are posted),
        post the receives of the one after it, and return (key, tensors)."""
        stream = wanted[:2]
        posted = self.posted.pop(stream, None)
        if posted is None:
            raise CommError(f"rank {self.rank}, op {waiter}: {_name(wanted)} is not among the messages "
                            f"the schedule says this rank receives in this call")
        src, _, control, _ = self.streams[stream]
        self._wait(posted.header_work, src, posted.key, waiter, "header")
        kind, partition, micro_batch, meta_len = posted.header.tolist()
        key = (KINDS[kind], partition, micro_batch)
        if key != posted.key:
            raise CommError(f"rank {self.rank}, op {waiter}: rank {src} sent {_name(key)} where the "
                            f"schedule says {_name(posted.key)} comes next (both ranks must run the "
                            f"same schedule and wpipe version)")
        tensors, works = posted.tensors, posted.works
        if meta_len:
            for work in works or []:   # filler of the old shapes
                self._wait(work, src, key, waiter, "filler")
            meta = torch.empty(meta_len, dtype=torch.int64)
            self._wait(dist.irecv(meta, src, group=control), src, key, waiter, "metadata")
            self.metadata[stream] = meta.tolist()
            tensors, works = self._recv_data(stream, decode_metadata(self.metadata[stream]), waiter)
        elif stream not in self.metadata:
            raise CommError(f"rank {self.rank}: rank {src} sent {_name(key)} without metadata "
                            f"on a new stream (both ranks must run the same wpipe version)")
        elif works is None:   # posted when taken
            tensors, works = self._recv_data(stream, decode_metadata(self.metadata[stream]), waiter)
        for work in works:
            self._wait(work, src, key, waiter, "data", on_device=self.on_device)
        self._post_next(stream)
        meta = decode_metadata(self.metadata[stream])
        if self.stage:   # from the pinned buffers, ordered before the compute that uses them
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        tensors = self.wire.decode(tensors, [restore for _, restore, _, _ in meta])
        return key, tuple(t.requires_grad_() if flag else t for t, (_, _, flag, _) in zip(tensors, meta))

    def _wait(self, work, src, key, waiter, part, on_device: bool = False):
        """Wait for `work`, the `part` of message `key` (None: `part` names the message):
        `on_device`, the compute stream waits and the watchdog keeps the deadline; else
        the host, up to the timeout."""
        what = part if key is None else f"the {part} of {_name(key)}"
        if on_device:
            work.wait()
            self.watchdog.watch(work, f"op {waiter}: {what} from rank {src}")
            return
        try:
            work.wait(self.timeout)
        except Exception as error:
            raise CommError(
                f"rank {self.rank}, op {waiter}: waited for {what} from rank {src} "
                f"and none came within {self.timeout.total_seconds():g} s ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Likely cause: rank {src} "
                f"stopped (crashed, was killed, or is stuck in an earlier op); its own log says why. "
                f"If it is only slow, raise timeout_s.") from error

    def _reap(self):
        self.in_flight = [entry for entry in self.in_flight if not entry[0].is_completed()]

    def finish(self, waiter: str = "end of train") -> None:
        """Wait until every send has left (a sender must keep its tensors until then); on
        the device, the compute stream waits (NCCL keeps the tensors until then)."""
        for work, _, what in self.in_flight:
            if self.on_device:
                work.wait()
                self.watchdog.watch(work, f"{waiter}: the send of {what}")
                continue
            try:
                work.wait(self.timeout)
            except Exception as error:
                raise CommError(f"rank {self.rank}, {waiter}: the send of {what} did not complete within "
                                f"{self.timeout.total_seconds():g} s. Likely cause: the receiving rank "
                                f"stopped or is stuck; its own log says why.") from error
        self.in_flight = []


def _name(key) -> str:
    kind, partition, micro_batch = key
    what = "output" if kind == "F" else "input gradients"
    return f"the {what} of op {partition}{kind}{micro_batch}"


def _op(key) -> str:
    """The op whose result a message carries, spelled like `str(Op)`: ("F", 1, 3) -> 1F3."""
    kind, partition, micro_batch = key
    return f"{partition}{kind}{micro_batch}"
