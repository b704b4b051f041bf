"""Communication under NCCL's host-visible rules, proved before anything runs. Pure.

`check_communication` replays every rank's part of a call as the transport carries it
(runtime/transport.py) under `Rules`, and raises `ScheduleError` naming every blocked rank,
its op and what it waits for, on the grid, when some rank could never go on.

The rules, each a switch, so that a replay shows what each one costs:

* creation: `eager`, every communicator exists before the call; `lazy`, as NCCL without a
  bound device: a communicator (any group the data path uses: each stream's data group,
  each data-parallel group) is created at its first use on each rank, and that use blocks
  the rank until every member has made its own first use (ncclCommInitRank is collective;
  ProcessGroupNCCL creates communicators at their first operation, pytorch#129140).
* warm_up (the transport): every rank uses each of its communicators once at start-up, in
  one global order (each replica's streams in `Topology.streams()` order, then the
  data-parallel groups). Meetings of ranks in one global order cannot deadlock, and no
  later use blocks for creation.
* sends: `buffered`, a send completes at once; `rendezvous`, only once the receiver posted
  the matching receive (ncclSend blocks the GPU until the peer's ncclRecv). The host waits
  for its sends only at the end of the call (`Transport.finish`).
* kernels: `async`, the host waits only where the transport waits; `blocking`, a posted
  receive or a started all-reduce may hold the host right where it was issued (NCCL
  kernels wait for their data, and a device-wide synchronisation, e.g. the caching
  allocator freeing memory, waits for every kernel: NCCL's "Using multiple NCCL
  communicators concurrently").
* posting (the transport): `ahead`, each incoming stream keeps the receive of its next
  message posted from the moment the previous one was taken (a stream's first message:
  once its shapes are known, i.e. when it is taken); `taken`, a receive is posted when the
  op that takes it is about to run.

Messages on one communicator match in the order they were issued (FIFO): a device that
needs a stream's message before an earlier one takes the earlier ones first and keeps them
(as the transport does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ScheduleError
from .messages import Key, destination, key, taken
from .methods import Op
from .topology import Topology

CHOICES = {"creation": ("eager", "lazy"), "sends": ("buffered", "rendezvous"),
           "kernels": ("async", "blocking"), "posting": ("ahead", "taken")}


@dataclass(frozen=True)
class Rules:
    """What blocks a rank's host (the module docstring says what each value means)."""
    creation: str = "eager"
    warm_up: bool = False
    sends: str = "buffered"
    kernels: str = "async"
    posting: str = "ahead"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Rules.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def __str__(self) -> str:
        return (f"{self.creation} creation{' after a warm-up' if self.warm_up else ''}, {self.sends} sends, "
                f"{self.kernels} kernels, receives posted {self.posting}")


GLOO = Rules(sends="rendezvous")
"""gloo: groups are connected when they are made; a send completes once its receive is
posted (gloo moves the payload only then); a posted receive never holds the host."""
NCCL = Rules(creation="lazy", warm_up=True, sends="rendezvous", kernels="blocking", posting="taken")
"""The transport over NCCL (and nccl_emulated), under NCCL's rules at their worst: lazy
creation made harmless by the warm-up, rendezvous sends, kernels that may hold the host."""


class Action(NamedTuple):
    """One thing a device's host does during its op `step` (-1: at start-up) of call
    `call`. `subject`: a message key and its call (post, await, take, send), (partition,
    update) (start, reduce: the data-parallel all-reduce), a communicator of the rank's
    replica (meet: ("stream", kind, partition) or ("replicas",)), or the messages the call
    sent (finish). `first_use`: under lazy creation, the communicator this action is the
    rank's first use of."""
    what: str          # meet, post, await, take, send, start, reduce, finish
    step: int
    subject: object = None
    call: int = 0
    first_use: tuple | None = None


def check_communication(schedule: list[list[Op]], topology: Topology, rules: Rules = NCCL) -> None:
    """Replay a run's calls of `schedule` on every rank of `topology` under `rules`; raise
    ScheduleError (`device d, step i, op X: ...`, every blocked rank, and the grid with each
    blocked op marked) when some rank would wait forever. `schedule` must pass
    check.lockstep. Two calls are replayed when receives are posted ahead (in the second,
    every stream's first message is posted ahead too); one otherwise (a second call is the
    first without its first uses of the communicators, so it ends when the first does)."""
    calls = 2 if rules.posting == "ahead" else 1
    sends = [[key(op) if destination(op, topology) is not None else None for op in ops] for ops in schedule]
    expected: list[list[Key]] = [[] for _ in schedule]     # each device's incoming keys, in their senders' order
    for ops, keys in zip(schedule, sends):
        for op, m in zip(ops, keys):
            if m is not None:
                expected[topology.device_of(destination(op, topology))].append(m)
    programs = [_program(schedule, topology, d, rules, calls, sends[d], expected[d]) for d in range(topology.depth)]
    blocked = _replay(programs, topology)
    if blocked:
        raise ScheduleError(_report(schedule, topology, rules, blocked))


def members(comm: tuple, topology: Topology) -> tuple[int, ...]:
    """The global ranks of communicator ("stream", replica, kind, partition) or
    ("replicas", device)."""
    if comm[0] == "replicas":
        return tuple(topology.rank_of(r, comm[1]) for r in range(topology.data_parallel))
    _, replica, kind, partition = comm
    return (topology.rank_of_partition(partition, replica),
            topology.rank_of_partition(partition + 1 if kind == "F" else partition - 1, replica))


# ------------------------------------------------------------------ what each device does

def _program(schedule, topology: Topology, device: int, rules: Rules, calls: int, sends: list[Key | None],
             expected: list[Key]) -> list[Action]:
    """What every rank of `device` does over `calls` calls, in the transport's order (the
    same on every replica: communicators are named within the rank's replica). `sends[i]`:
    the message op i sends, if any; `expected`: the keys the device receives, in their
    senders' order (messages.incoming)."""
    program: list[Action] = []
    if rules.warm_up:
        program += [Action("meet", -1, ("stream", kind, p)) for kind, p, a, b in topology.streams() if device in (a, b)]
        program += [Action("meet", -1, ("replicas",))] if topology.data_parallel > 1 else []
    receives = [taken(op, topology) for op in schedule[device]]
    known: set[tuple] = set()                                      # incoming streams whose shapes are known
    updates = dict.fromkeys(topology.partitions_of(device), 0)     # over the whole run
    for call in range(calls):
        program += _call(schedule[device], topology, rules, call, receives, sends, expected, known, updates)
    return _mark_first_uses(program) if rules.creation == "lazy" else program


def _call(ops: list[Op], topology: Topology, rules: Rules, call: int, receives, sends, expected,
          known: set, updates: dict) -> list[Action]:
    """One call of `_program` (its messages tagged with `call`); updates `known` (streams
    whose shapes this device learnt) and `updates` (updates started per partition)."""
    actions: list[Action] = []
    dp = topology.data_parallel > 1
    queue: dict[tuple, list[Key]] = {}
    for m in expected:
        queue.setdefault(m[:2], []).append(m)
    posted: set[Key] = set()
    received: set[Key] = set()       # taken from the stream (kept when it came before it was asked for)
    sent: list[tuple] = []
    pending: set[int] = set()

    def act(what, step, subject):
        actions.append(Action(what, step, subject, call))

    def post(step, m, ahead: bool):
        posted.add(m)
        act("post", step, m + (call,))
        if ahead and rules.kernels == "blocking":    # (when taken, the take waits for it anyway)
            act("await", step, m + (call,))

    def post_ahead(step):
        for stream, keys in queue.items():
            if rules.posting == "ahead" and keys and stream in known and keys[0] not in posted:
                post(step, keys[0], ahead=True)

    def reduce(step, p, update):
        act("reduce", step, (p, update))

    post_ahead(0)
    for i, op in enumerate(ops):
        if op.kind == "U":
            if dp:
                act("start", i, (op.partition, updates[op.partition]))
                if rules.kernels == "blocking":
                    reduce(i, op.partition, updates[op.partition])
                else:
                    pending.add(op.partition)
            updates[op.partition] += 1
            continue
        if op.partition in pending:            # the engine finishes an update before the partition's next op
            pending.discard(op.partition)
            reduce(i, op.partition, updates[op.partition] - 1)
        m = receives[i]
        while m is not None and m not in received:    # a stream's earlier messages first (FIFO)
            head = queue[m[:2]].pop(0)
            if head not in posted:
                post(i, head, ahead=False)
            act("take", i, head + (call,))
            received.add(head)
            known.add(m[:2])
            post_ahead(i)
        if sends[i] is not None:
            act("send", i, sends[i] + (call,))
            sent.append(sends[i] + (call,))
    for p in sorted(pending):
        reduce(len(ops) - 1, p, updates[p] - 1)
    act("finish", len(ops) - 1, tuple(sent) if rules.sends == "rendezvous" else ())
    return actions


def _mark_first_uses(program: list[Action]) -> list[Action]:
    seen, out = set(), []
    for action in program:
        comm = _comm_of(action)
        if comm is not None and comm not in seen:
            seen.add(comm)
            action = action._replace(first_use=comm)
        out.append(action)
    return out


def _comm_of(action: Action) -> tuple | None:
    """The communicator an action uses, within its rank's replica (None: it uses none)."""
    if action.what == "meet":
        return action.subject
    if action.what in ("post", "await", "take", "send"):
        return ("stream",) + action.subject[:2]
    if action.what in ("start", "reduce"):
        return ("replicas",)
    return None


# ------------------------------------------------------------------ the replay

def _replay(programs: list[list[Action]], topology: Topology) -> dict[int, Action]:
    """Run every rank's program as far as the rules let it; return each stuck rank's
    action (empty when every rank finished). A rank waits only for events that, once
    they happened, stay so: the order in which ranks are advanced does not matter."""
    ranks = range(topology.world_size)
    place = [topology.coordinates(rank) for rank in ranks]
    happened: set[tuple] = set()                  # ("posted" | "sent", replica, key), ("all", meeting)
    arrived: dict[tuple, set[int]] = {}           # meeting ("create" | "meet", communicator) -> ranks there
    started: dict[tuple, int] = {}                # (device, partition, update) -> ranks that started it
    waiting: dict[tuple, list[int]] = {}          # event -> ranks blocked until it happens
    pc = [0] * topology.world_size
    todo = list(ranks)

    def happen(event):
        happened.add(event)
        todo.extend(waiting.pop(event, []))

    def meet(rank, what, local) -> tuple:
        """Register `rank` at a meeting; return the event of everyone being there."""
        replica, device = place[rank]
        if local[0] == "replicas":
            comm, size = ("replicas", device), topology.data_parallel
        else:
            comm, size = ("stream", replica) + local[1:], 2
        there = arrived.setdefault((what, comm), set())
        there.add(rank)
        if len(there) == size:
            happen(("all", what, comm))
        return ("all", what, comm)

    def blocker(rank, action) -> tuple | None:
        """Do `action` on `rank`, or return the event it waits for."""
        replica, device = place[rank]
        if action.first_use is not None and (event := meet(rank, "create", action.first_use)) not in happened:
            return event
        what, subject = action.what, action.subject
        if what == "meet":
            event = meet(rank, "meet", subject)
            return None if event in happened else event
        if what in ("post", "send"):
            happen(("posted" if what == "post" else "sent", replica, subject))
        elif what in ("await", "take") and ("sent", replica, subject) not in happened:
            return ("sent", replica, subject)
        elif what == "take" and ("posted", replica, subject) not in happened:
            return ("posted", replica, subject)
        elif what == "start":
            count = started[(device,) + subject] = started.get((device,) + subject, 0) + 1
            if count == topology.data_parallel:
                happen(("reduced", device) + subject)
        elif what == "reduce" and ("reduced", device) + subject not in happened:
            return ("reduced", device) + subject
        elif what == "finish":
            return next((("posted", replica, m) for m in subject if ("posted", replica, m) not in happened), None)
        return None

    while todo:
        rank = todo.pop()
        program = programs[place[rank][1]]
        while pc[rank] < len(program):
            event = blocker(rank, program[pc[rank]])
            if event is not None:
                waiting.setdefault(event, []).append(rank)
                break
            pc[rank] += 1
    return {rank: programs[place[rank][1]][pc[rank]] for rank in ranks if pc[rank] < len(programs[place[rank][1]])}


# ------------------------------------------------------------------ the report

def _report(schedule, topology: Topology, rules: Rules, blocked: dict[int, Action]) -> str:
    from .check import format_schedule  # check.py imports this module

    lines, marks = [], []
    for rank, action in sorted(blocked.items()):
        replica, device = topology.coordinates(rank)
        step = max(action.step, 0)
        when = " (start-up)" if action.step < 0 else f" (call {action.call + 1})" if action.call else ""
        lines.append(f"device {device}, step {step}, op {schedule[device][step]}{when}: rank {rank} "
                     f"{_waits_for(action, replica, device, topology)}")
        if (device, step) not in marks:
            marks.append((device, step))
    where, what = lines[0].split(": ", 1)
    return ("\n  ".join([f"{where}: deadlock ({rules}): {what}", *lines[1:]]) + "\n"
            + format_schedule(schedule, marks))


def _waits_for(action: Action, replica: int, device: int, topology: Topology) -> str:
    what, subject = action.what, action.subject
    if action.first_use is not None and what != "meet":
        return (f"waits in its first use of {_comm_name(action.first_use, replica, device, topology)}, to "
                f"{_doing(action, replica, topology)} (lazy creation: every member's first use meets there)")
    if what == "meet":
        return f"waits at start-up for every member of {_comm_name(subject, replica, device, topology)} (warm-up)"
    if what in ("await", "take"):
        posted = " (its receive, posted here, holds the host: blocking kernels)" if what == "await" else ""
        return f"waits for {_name(subject)} from rank {topology.rank_of_partition(subject[1], replica)}{posted}"
    if what == "reduce":
        return (f"waits for the data-parallel all-reduce of partition {subject[0]}'s update {subject[1]} over "
                f"ranks {list(members(('replicas', device), topology))}")
    return "waits at the end of the call for its sends to be received (rendezvous sends)"


def _doing(action: Action, replica: int, topology: Topology) -> str:
    what, subject = action.what, action.subject
    if what in ("post", "await", "take"):
        return f"post the receive of {_name(subject)}"
    if what == "send":
        return f"send {_name(subject)} to rank {_receiver(replica, subject, topology)}"
    return f"start the data-parallel all-reduce of partition {subject[0]}'s update {subject[1]}"


def _comm_name(local: tuple, replica: int, device: int, topology: Topology) -> str:
    if local[0] == "replicas":
        ranks = list(members(("replicas", device), topology))
        return f"the data-parallel communicator of device {device} (ranks {ranks})"
    _, kind, partition = local
    src, dst = members(("stream", replica, kind, partition), topology)
    what = "outputs" if kind == "F" else "input gradients"
    return f"the communicator of stream {kind}{partition} (partition {partition}'s {what}, rank {src} -> {dst})"


def _receiver(replica: int, message: Key, topology: Topology) -> int:
    kind, partition = message[:2]
    return topology.rank_of_partition(partition + 1 if kind == "F" else partition - 1, replica)


def _name(message: tuple) -> str:
    kind, partition, micro_batch = message[:3]
    return f"the {'output' if kind == 'F' else 'input gradients'} of op {partition}{kind}{micro_batch}"
