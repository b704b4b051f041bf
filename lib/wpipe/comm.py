"""Point-to-point transfer of tensor tuples between two ranks, with timeouts.

A message is a tuple of tensors (a partition's outputs, or the gradients of its inputs)
plus a key naming it (`("F", 2, 3)` = the output of partition 2's forward of micro-batch
3). On the wire, per message and in this order:

1. a header, 4 int64 on the control group (gloo, CPU): kind, partition, micro-batch and the
   length of the metadata that follows (0 when the tensors have the same dtypes, shapes
   and gradient flags as the previous message on this link: metadata is cached per link
   and sent again only when it changes, e.g. for a last, smaller batch);
2. the metadata, when its length is non-zero;
3. the tensors, on the data group (the run's backend: NCCL tensors live on the GPU).

Each direction between two ranks has its own groups (see topology.create_groups), so a
link is a FIFO: messages arrive in the order they were sent. A receiver that needs a
later message first keeps the earlier ones until asked for them. Every wait has a
timeout and fails with `CommError` naming both ranks, the message and the likely cause.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
KIND_CODES = {"F": 0, "B": 1}
KINDS = {code: kind for kind, code in KIND_CODES.items()}


class CommError(RuntimeError):
    pass


def encode_metadata(tensors: tuple[torch.Tensor, ...]) -> list[int]:
    """[count, then per tensor: dtype code, requires_grad, ndim, *shape]."""
    meta = [len(tensors)]
    for t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {t.dtype}; supported: {DTYPES}")
        meta += [DTYPES.index(t.dtype), int(t.requires_grad), t.dim(), *t.shape]
    return meta


def decode_metadata(meta: list[int]) -> list[tuple[torch.dtype, bool, tuple[int, ...]]]:
    out, i = [], 1
    for _ in range(meta[0]):
        dtype, requires_grad, ndim = meta[i:i + 3]
        out.append((DTYPES[dtype], bool(requires_grad), tuple(meta[i + 3:i + 3 + ndim])))
        i += 3 + ndim
    return out


class Links:
    """This rank's ends of its point-to-point links."""

    def __init__(self, rank: int, control_groups: dict, data_groups: dict,
                 device: torch.device, timeout_s: float):
        self.rank = rank
        self.control = control_groups     # (src, dst) -> group
        self.data = data_groups
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.sent_metadata: dict[int, list[int]] = {}
        self.received_metadata: dict[int, list] = {}
        self.early: dict[tuple, tuple[torch.Tensor, ...]] = {}   # arrived before asked for
        self.in_flight: list[tuple[object, object, str]] = []    # (work, tensors kept alive, what)

    def send(self, dst: int, key: tuple[str, int, int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Start sending `tensors` (detached, made contiguous) to global rank `dst`."""
        control, data = self.control[(self.rank, dst)], self.data[(self.rank, dst)]
        # The gradient flags tell the receiver which inputs are leaves to differentiate.
        meta = encode_metadata(tensors)
        tensors = tuple(t.detach().contiguous() for t in tensors)
        changed = self.sent_metadata.get(dst) != meta
        header = torch.tensor([KIND_CODES[key[0]], key[1], key[2], len(meta) if changed else 0])
        what = f"{_name(key)} to rank {dst}"
        self.in_flight.append((dist.isend(header, dst, group=control), header, what))
        if changed:
            meta_tensor = torch.tensor(meta)
            self.in_flight.append((dist.isend(meta_tensor, dst, group=control), meta_tensor, what))
            self.sent_metadata[dst] = meta
        for t in tensors:
            self.in_flight.append((dist.isend(t, dst, group=data), t, what))
        self._reap()

    def recv(self, src: int, key: tuple[str, int, int], waiter: str) -> tuple[torch.Tensor, ...]:
        """Receive the message `key` from global rank `src`; `waiter` names the op that
        needs it, for errors. Received floats flagged as needing gradients come back as
        leaves with requires_grad=True."""
        if key in self.early:
            return self.early.pop(key)
        while True:
            got, tensors = self._recv_next(src, key, waiter)
            if got == key:
                return tensors
            self.early[got] = tensors

    def _recv_next(self, src, wanted, waiter):
        control, data = self.control[(src, self.rank)], self.data[(src, self.rank)]
        header = torch.empty(4, dtype=torch.int64)
        self._wait(dist.irecv(header, src, group=control), src, wanted, waiter, "header")
        kind, partition, micro_batch, meta_len = header.tolist()
        key = (KINDS[kind], partition, micro_batch)
        if meta_len:
            meta = torch.empty(meta_len, dtype=torch.int64)
            self._wait(dist.irecv(meta, src, group=control), src, key, waiter, "metadata")
            self.received_metadata[src] = decode_metadata(meta.tolist())
        elif src not in self.received_metadata:
            raise CommError(f"rank {self.rank}: rank {src} sent {_name(key)} without metadata "
                            f"on a new link (both ranks must run the same wpipe version)")
        tensors = []
        for dtype, requires_grad, shape in self.received_metadata[src]:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(dist.irecv(t, src, group=data), src, key, waiter, "data")
            tensors.append(t.requires_grad_() if requires_grad else t)
        return key, tuple(tensors)

    def _wait(self, work, src, key, waiter, part):
        try:
            work.wait(self.timeout)
        except Exception as error:
            raise CommError(
                f"rank {self.rank}, op {waiter}: waited for the {part} of {_name(key)} from rank {src} "
                f"and none came within {self.timeout.total_seconds():g} s ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Likely cause: rank {src} "
                f"stopped (crashed, was killed, or is stuck in an earlier op); its own log says why. "
                f"If it is only slow, raise timeout_s.") from error

    def _reap(self):
        self.in_flight = [entry for entry in self.in_flight if not entry[0].is_completed()]

    def finish(self, waiter: str = "end of train") -> None:
        """Wait until every send has left (a sender must keep its tensors until then)."""
        for work, _, what in self.in_flight:
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
