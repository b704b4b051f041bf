"""Runs one device's op list: the only interpreter of a schedule.

Every rank builds its own partitions, checks the schedule, then walks its device's ops:

* F: take the inputs (micro-batch data for partition 0, else the previous partition's
  output), run the partition on the weights version its period uses, stash what the
  backward needs, send the outputs on (or compute the loss on the last partition);
* B: backward from the loss (scaled by 1/m) or from the received output gradients, send
  the input gradients back;
* U: the group's update: average the period's gradients over the replicas (started
  asynchronously) and step its optimizer, making a new weights version (versions.py).
  The step runs when the rank would otherwise wait for a message, or at the latest
  before the partition's next op: the same arithmetic as at the U's place in the order
  (nothing touches the partition in between), but off the critical path, where the
  other devices wait for this one's next op.

Failures are re-raised naming rank, step and op; waits time out (transport.py). With
`cfg.trace`, every op's compute and every wait is recorded (trace.py). `cfg.precision`
and `cfg.wire_dtype` follow precision.py: forwards under autocast, the loss in fp32, and
with fp16 the loss scale of the micro-batch's period and the agreed skip of an update
whose gradients overflowed.
"""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from .. import schedule
from ..config import PipelineConfig
from ..errors import CommError
from ..schedule import Topology, check_schedule, format_schedule, last_uses
from ..trace import Recorder, common_origin
from . import precision
from .distributed import create_groups, resolve_backends, run_device
from .transport import Links
from .versions import WeightVersions


@dataclass
class _Stashed:
    """What a forward leaves for its backward."""
    inputs: tuple
    outputs: tuple | None      # None with recomputation
    loss: torch.Tensor | None
    version: int
    rng: tuple | None          # RNG state at the forward, to recompute it exactly
    nbytes: int


class Pipeline:
    """One rank's part of a pipeline-parallel (and data-parallel) training run.

    Call on every rank after torch.distributed is initialised (`init_distributed`).
    `build_partition(i)` is called only for this rank's partitions; `make_optimizer(params)`
    once per local partition; `make_lr_scheduler(optimizer)`, if given, is stepped after
    every update of that partition.

    With `loopback` (probe.Loopback) it runs one device position of replica 0 in a plain
    process instead, no process group: the same ops, with every message to or from another
    device going through the loopback, and no data-parallel all-reduce.
    """

    def __init__(self, build_partition: Callable[[int], nn.Module], loss_fn: Callable,
                 make_optimizer: Callable, cfg: PipelineConfig, *,
                 make_lr_scheduler: Callable | None = None, loopback=None):
        cfg.validate()
        self.cfg = cfg
        self.topology = Topology.from_config(cfg)
        if loopback is None:
            backend = self._check_process_group()
            self.rank = dist.get_rank()
            self.replica, self.device_index = self.topology.coordinates(self.rank)
            _, p2p_backend = resolve_backends(backend, cfg.p2p_backend)
            self.device = run_device(backend, cfg.p2p_backend)
        else:   # probe mode: one device of replica 0, alone (probe.py)
            self.replica, self.device_index = 0, loopback.device_index
            self.rank = self.topology.rank_of(0, self.device_index)
            self.device = loopback.device
            backend = p2p_backend = None
        # gloo carries CUDA tensors only through CPU buffers: stage them ourselves.
        self.collective_device = torch.device("cpu") if backend == "gloo" else self.device
        self.precision = precision.Policy.from_config(cfg, self.device.type)
        self.precision.check_device()
        self.num_partitions = self.topology.num_partitions
        self.last_partition = self.num_partitions - 1
        self.loss_fn = loss_fn

        self.local_partitions: dict[int, nn.Module] = {}
        for p in self.topology.partitions_of(self.device_index):
            module = build_partition(p)
            if not isinstance(module, nn.Module):
                raise TypeError(f"rank {self.rank}: build_partition({p}) returned "
                                f"{type(module).__name__}, expected a torch.nn.Module")
            self.local_partitions[p] = module.to(self.device)
        self.versions = {p: WeightVersions(m, make_optimizer(list(m.parameters())))
                         for p, m in self.local_partitions.items()}
        self.lr_schedulers = ({p: make_lr_scheduler(v.optimizer) for p, v in self.versions.items()}
                              if make_lr_scheduler else {})

        self.dp_ranks = [self.topology.rank_of(r, self.device_index) for r in range(cfg.data_parallel)]
        self.trace = Recorder(cfg.trace, self.rank, synchronize=loopback is not None and self.device.type == "cuda")
        method = schedule.get_method(cfg.method)
        self.scaler_group = {p: precision.group_of(method.stale(p, cfg.pipeline_depth)) for p in self.local_partitions}
        if loopback is None:
            groups = create_groups(self.topology, self.rank, backend, p2p_backend)
            self.dp_group = groups.data_parallel
            self.links = Links(self.rank, groups.streams, self.device, cfg.timeout_s, self.trace,
                               self.precision.wire, stage=p2p_backend == "gloo" and self.device.type == "cuda")
            scaler = self.precision.make_scaler(cfg.method, cfg.pipeline_depth)
            self.scaler = precision.Agreement(scaler, self.rank, cfg.timeout_s) if scaler else None
            if cfg.trace:
                self.trace.set_origin(common_origin())
        else:   # no peers: the loopback stands in for them; no all-reduce, no fp16 scaler (probe.py)
            self.dp_group, self.links, self.scaler = None, loopback, None

        self.stash_bytes = 0
        self.stash_peak_bytes = 0
        self._periods_done = 0   # periods trained by earlier calls of train()

    def _check_process_group(self) -> str:
        """The backend of the initialised process group, whose size must be N x D."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                               "wpipe.init_distributed() before building a Pipeline")
        if dist.get_world_size() != self.topology.world_size:
            raise ValueError(f"world size is {dist.get_world_size()} but pipeline_depth {self.cfg.pipeline_depth} "
                             f"x data_parallel {self.cfg.data_parallel} = {self.topology.world_size}: launch "
                             f"{self.topology.world_size} processes or change the two fields")
        return dist.get_backend()

    @property
    def computes_loss(self) -> bool:
        """Whether this rank holds the last partition (computes the loss, returns outputs)."""
        return self.last_partition in self.local_partitions

    # ------------------------------------------------------------------ public

    def train(self, micro_batches: Iterable, on_period: Callable | None = None) -> list[float]:
        """Train on `micro_batches`, a whole number of periods of (inputs, target).

        Items are pulled lazily, in order, only on the ranks that hold the first or last
        partition. `on_period(t, loss)` is called on every rank once all its partitions
        applied period t's update (loss is the period's mean loss on the loss rank, else
        None). Returns the per-period mean losses on the loss rank, [] elsewhere. When it
        returns, every update has been applied and every send has completed.
        """
        count = self._count(micro_batches)
        period = schedule.validate(self.cfg.method, self.cfg.pipeline_depth, count,
                                   self.cfg.micro_batches_per_update)
        full = schedule.build_schedule(self.cfg.method, self.cfg.pipeline_depth, count, period)
        # The orders repeat every period: proving the first few periods proves the rest.
        checked = min(count, 8 * period)
        check_schedule(full if checked == count else
                       schedule.build_schedule(self.cfg.method, self.cfg.pipeline_depth, checked, period),
                       self.cfg.method, self.cfg.pipeline_depth, checked, period)
        ops = full[self.device_index]
        self._period = period
        method = schedule.get_method(self.cfg.method)
        for p, state in self.versions.items():
            last_use = last_uses(ops, p, lambda mb, p=p: self._version(p, mb))
            if method.stale(p, self.cfg.pipeline_depth):
                # The next call's first period runs on the version before the newest.
                last_use[self._periods_done + count // period - 1] = len(ops)
            state.plan(last_use)

        self._source, self._items, self._next_item, self._count_items = iter(micro_batches), {}, 0, count
        self._stash: dict[tuple[int, int], _Stashed] = {}
        self._local: dict[tuple, tuple] = {}
        self._pending: dict[int, tuple] = {}
        self._updates_started = {p: 0 for p in self.versions}
        self._updates_done = [0] * (count // period)
        self._loss_sum = [0.0] * (count // period)
        self._on_period = on_period
        for module in self.local_partitions.values():
            module.train()

        self.links.expect(self._incoming(full))
        with self.trace.span("call", "train", {"micro_batches": count}):
            self._run(full, ops, {"F": self._forward, "B": self._backward, "U": self._update})
            with self.trace.span("wait", "wait sends"):
                self.links.finish()
        self._periods_done += count // period
        if not self.computes_loss:
            return []
        return [float(s) / period for s in self._loss_sum]

    def evaluate(self, micro_batches: Iterable) -> list[tuple]:
        """Forward-only pipelined pass on the newest weights, modules in eval mode.
        Returns (output of the last partition, target) per micro-batch on the loss rank,
        [] elsewhere. Any number of micro-batches; the last may be smaller."""
        count = self._count(micro_batches)
        period = self.cfg.period
        padded = math.ceil(count / period) * period
        full = [[op for op in ops if op.kind == "F" and op.micro_batch < count]
                for ops in schedule.build_schedule(self.cfg.method, self.cfg.pipeline_depth, padded, period)]
        self._source, self._items, self._next_item, self._count_items = iter(micro_batches), {}, 0, count
        self._local, self._pending = {}, {}
        self._outputs = []
        modes = {p: m.training for p, m in self.local_partitions.items()}
        for module in self.local_partitions.values():
            module.eval()
        try:
            self.links.expect(self._incoming(full))
            with torch.no_grad():
                self._run(full, full[self.device_index], {"F": self._forward_eval})
            self.links.finish("end of evaluate")
        finally:
            for p, module in self.local_partitions.items():
                module.train(modes[p])
        return self._outputs

    def state_dict(self) -> dict:
        """This rank's training state between calls of train(): per local partition its
        weights versions and optimizer (and LR scheduler) state, and the period count.
        Loading it into a Pipeline built with the same configuration continues the run
        exactly, stale weight versions included."""
        return {"periods_done": self._periods_done, "rank": self.rank,
                "loss_scaler": self.scaler.scaler.state_dict() if self.scaler else None,
                "partitions": {p: {**v.state_dict(),
                                   "lr_scheduler": self.lr_schedulers[p].state_dict() if self.lr_schedulers else None}
                               for p, v in self.versions.items()}}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["partitions"]) != sorted(self.versions):
            raise ValueError(f"rank {self.rank}: the saved state holds partitions {sorted(state['partitions'])} "
                             f"(saved by rank {state['rank']}), this rank holds {sorted(self.versions)}: "
                             f"resume with the same method, pipeline_depth, data_parallel and rank_layout")
        for p, saved in state["partitions"].items():
            self.versions[p].load_state_dict(saved)
            if self.lr_schedulers and saved["lr_scheduler"] is not None:
                self.lr_schedulers[p].load_state_dict(saved["lr_scheduler"])
        self._periods_done = state["periods_done"]
        if self.scaler and state.get("loss_scaler"):
            self.scaler.scaler.load_state_dict(state["loss_scaler"])

    def memory_report(self) -> dict:
        """Bytes this rank's runtime held: peak weights incl. versions, peak stashed
        activations (tensors autograd saved plus received inputs, in the dtypes they are
        stored in: autocast's fp16/bf16 copies shrink it), optimizer state, and the
        measured process peak (CUDA max allocated, or CPU max resident set); with the
        precision and wire dtype they were measured under."""
        optimizer_bytes = sum(t.numel() * t.element_size()
                              for v in self.versions.values() for state in v.optimizer.state.values()
                              for t in state.values() if torch.is_tensor(t))
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"
        return {"rank": self.rank, "replica": self.replica, "device": self.device_index,
                "partitions": sorted(self.local_partitions),
                "weights_bytes": sum(v.peak_bytes for v in self.versions.values()),
                "activations_bytes": self.stash_peak_bytes,
                "optimizer_state_bytes": optimizer_bytes,
                "peak_bytes": peak, "peak_kind": kind,
                "precision": self.cfg.precision, "wire_dtype": self.cfg.wire_dtype}

    def precision_report(self) -> dict:
        """The precision settings, and with fp16 the loss scale's changes ([period, scale],
        periods of the run from 0) and, per scaler group, the updates skipped for overflow."""
        report = {"precision": self.cfg.precision, "wire_dtype": self.cfg.wire_dtype,
                  "p2p_backend": resolve_backends(dist.get_backend(), self.cfg.p2p_backend)[1],
                  "device": str(self.device)}
        if self.scaler:
            self.scaler.scale(self._periods_done - 1)   # every verdict it needs has arrived
            report.update(loss_scale_changes=self.scaler.scaler.changes(self._periods_done),
                          overflow_skips=self.scaler.scaler.skipped())
        return report

    def trace_events(self) -> list[dict]:
        """This rank's recorded events in Chrome trace-event form (trace.py); only the
        process name when `cfg.trace` is off."""
        return self.trace.chrome_events(f"rank {self.rank} (replica {self.replica}, device {self.device_index})")

    # ------------------------------------------------------------------ the loop

    def _run(self, full, ops, handlers) -> None:
        """Run `ops`, then the updates still pending. A failure is re-raised naming the op
        that failed (`self._doing`: an update that runs while another op waits is named
        itself) with the grid."""
        try:
            for i, op in enumerate(ops):
                self._doing = (i, op)
                if op.partition in self._pending and op.kind != "U":
                    self._finish_update(op.partition)
                with torch.profiler.record_function(str(op)):
                    handlers[op.kind](i, op)
            for p in list(self._pending):
                self._finish_update(p)
        except CommError:
            raise
        except Exception as error:
            i, op = self._doing
            grid = (format_schedule(full, (self.device_index, i)) if len(full[0]) <= 200
                    else "ops here: " + " ".join(str(o) for o in ops[max(0, i - 6):i + 7]))
            raise RuntimeError(f"rank {self.rank} (replica {self.replica}, device {self.device_index}), "
                               f"step {i}, op {op}: {type(error).__name__}: {error}\n{grid}") from error

    def _forward(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        inputs = self._inputs(mb, keep_target=self.computes_loss) if p == 0 else self._receive(("F", p - 1, mb), p - 1, op)
        with self.trace.span("compute", op):
            self._forward_compute(p, mb, inputs)

    def _forward_compute(self, p, mb, inputs) -> None:
        version = self._version(p, mb)
        weights = self.versions[p].weights(version)
        rng, saved = None, {}
        if self.cfg.recompute:
            # Built with autograd (then dropped) so that the outputs say which of them
            # need gradients; the peak is the same as when it is recomputed.
            rng = self._rng_state()
            with self.precision.autocast():
                out = self._call(p, weights, inputs)
        else:
            with self._count_saved(p, weights, saved), self.precision.autocast():
                out = self._call(p, weights, inputs)
        outputs = out if isinstance(out, tuple) else (out,)
        loss = None
        if p == self.last_partition:
            loss = self.loss_fn(self.precision.loss_input(out), self._target(mb))
            self._loss_sum[mb // self._period] += loss.detach()
        else:
            self._send(("F", p, mb), p + 1, outputs)
        del out
        nbytes = sum(saved.values()) + _nbytes(inputs)
        self._stash[(p, mb)] = _Stashed(inputs, None if self.cfg.recompute else outputs,
                                        None if self.cfg.recompute else loss, version, rng, nbytes)
        self.stash_bytes += nbytes
        self.stash_peak_bytes = max(self.stash_peak_bytes, self.stash_bytes)

    def _backward(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        entry = self._stash.pop((p, mb))
        outputs, loss = entry.outputs, entry.loss
        if self.cfg.recompute:   # before the gradients are needed: it overlaps their transfer
            with self.trace.span("compute", f"recompute {op}"):
                outputs, loss = self._recompute(p, mb, entry)
        grads = None if p == self.last_partition else self._receive(("B", p + 1, mb), p + 1, op)
        with self.trace.span("compute", op):
            self._backward_compute(p, mb, entry, outputs, loss, grads)

    def _backward_compute(self, p, mb, entry, outputs, loss, grads) -> None:
        if p == self.last_partition:
            if self.scaler:
                loss = loss * self.scaler.scale(self._periods_done + mb // self._period)
            (loss / self._period).backward()
        else:
            roots = [o for o in outputs if o.requires_grad]
            if len(roots) != len(grads):
                raise RuntimeError(f"partition {p} has {len(roots)} outputs that need gradients "
                                   f"but {len(grads)} gradients came back")
            torch.autograd.backward(roots, grads)
        if p > 0:
            self._send(("B", p, mb), p - 1, tuple(x.grad if x.grad is not None else torch.zeros_like(x)
                                                  for x in entry.inputs if x.requires_grad))
        self.stash_bytes -= entry.nbytes

    def _update(self, i, op) -> None:
        p = op.partition
        t = self._updates_started[p]
        self._updates_started[p] += 1
        grads = self.versions[p].gradients(self._version(p, t * self._period))
        if self.scaler:
            self.scaler.start(self.scaler_group[p], self._periods_done + t, grads)
        work = flat = None
        if self.dp_group is not None:
            with self.trace.span("compute", f"reduce {op}"):
                flat = torch.cat([g.reshape(-1) for g in grads]).to(self.collective_device)
                work = dist.all_reduce(flat, group=self.dp_group, async_op=True)
        self._pending[p] = (work, flat, grads, i, t, op)

    def _update_ready(self, p) -> bool:
        """Whether the pending update of `p` can finish without waiting."""
        work, *_, t, _ = self._pending[p]
        return ((work is None or work.is_completed())
                and (not self.scaler or self.scaler.ready(self.scaler_group[p], self._periods_done + t)))

    def _finish_update(self, p) -> None:
        work, flat, grads, index, t, op = self._pending.pop(p)
        running, self._doing = self._doing, (index, op)
        if work is not None:
            try:
                with self.trace.span("wait", f"wait allreduce {op}"):
                    work.wait(self.links.timeout)
            except Exception as error:
                raise CommError(f"rank {self.rank}, op {op}: the data-parallel all-reduce of partition "
                                f"{p}'s gradients over ranks {self.dp_ranks} did not complete within "
                                f"{self.cfg.timeout_s:g} s. Likely cause: one of those ranks stopped; "
                                f"its own log says why.") from error
        step = True
        if self.scaler:
            run_period = self._periods_done + t
            step = not self.scaler.overflow(self.scaler_group[p], run_period)
        with self.trace.span("compute", op):
            if work is not None:
                flat /= self.cfg.data_parallel
                grads = [chunk.view_as(g).to(g.device)
                         for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
            if self.scaler and step:
                inverse = 1 / self.scaler.scale(run_period)
                grads = [g * inverse for g in grads]
            self.versions[p].update(grads, index, step=step)
            if self.lr_schedulers:
                self.lr_schedulers[p].step()
        self._updates_done[t] += 1
        if self._updates_done[t] == len(self.versions) and self._on_period is not None:
            loss = float(self._loss_sum[t]) / self._period if self.computes_loss else None
            self._on_period(t, loss)
        self._doing = running

    def _forward_eval(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        inputs = self._inputs(mb, keep_target=self.computes_loss) if p == 0 else self._receive(("F", p - 1, mb), p - 1, op)
        with self.precision.autocast():
            out = self._call(p, None, inputs)
        if p == self.last_partition:
            self._outputs.append((self.precision.loss_input(out), self._fetch(mb)[1]))
            del self._items[mb]
        else:
            self._send(("F", p, mb), p + 1, out if isinstance(out, tuple) else (out,))

    # ------------------------------------------------------------------ helpers

    def _version(self, p: int, micro_batch: int) -> int:
        """Weights version (updates since the start) that micro-batch `micro_batch` of
        the current call runs on. Calls of train() continue one run: the period count
        goes on, so a stale partition's first period in a call runs on W(t-1)."""
        return schedule.weights_version(self.cfg.method, p, self.cfg.pipeline_depth,
                                        self._periods_done * self._period + micro_batch, self._period)

    def _call(self, p, weights, inputs):
        module = self.local_partitions[p]
        return module(*inputs) if weights is None else functional_call(module, weights, inputs)

    def _recompute(self, p, mb, entry):
        """Run the forward again with autograd, on the same weights, RNG state and
        BatchNorm statistics as the first time (the statistics are put back after)."""
        module = self.local_partitions[p]
        buffers = [(b, b.clone()) for b in module.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        saved = {}
        with torch.random.fork_rng(devices=devices):
            self._set_rng_state(entry.rng)
            with self._count_saved(p, self.versions[p].weights(entry.version), saved), self.precision.autocast():
                out = self._call(p, self.versions[p].weights(entry.version), entry.inputs)
        for buffer, value in buffers:
            buffer.copy_(value)
        self.stash_peak_bytes = max(self.stash_peak_bytes, self.stash_bytes + sum(saved.values()))
        loss = (self.loss_fn(self.precision.loss_input(out), self._target_kept(mb))
                if p == self.last_partition else None)
        return (out if isinstance(out, tuple) else (out,)), loss

    def _rng_state(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def _set_rng_state(self, state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def _count_saved(self, p, weights, saved: dict):
        """Record the bytes of the tensors autograd saves (weights excluded), by storage."""
        weight_ptrs = {t.data_ptr() for t in (weights.values() if weights else self.local_partitions[p].parameters())}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.data_ptr() not in weight_ptrs and ptr not in saved:
                saved[ptr] = t.untyped_storage().nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _incoming(self, full) -> list[tuple]:
        """The keys of the messages other ranks of this replica send this rank during
        `full`, each sender's in its order."""
        keys = []
        for device, ops in enumerate(full):
            if device != self.device_index:
                for op in ops:
                    to = op.partition + 1 if op.kind == "F" else op.partition - 1
                    if op.kind != "U" and 0 <= to < self.num_partitions and self.topology.device_of(to) == self.device_index:
                        keys.append((op.kind, op.partition, op.micro_batch))
        return keys

    def _send(self, key, to_partition: int, tensors: tuple) -> None:
        if self.topology.device_of(to_partition) == self.device_index:  # wpipe with depth 1
            self._local[key] = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        else:
            self.links.send(key, tensors)

    def _receive(self, key, from_partition: int, op) -> tuple:
        if self.topology.device_of(from_partition) == self.device_index:
            return self._local.pop(key)
        if self._pending and not self.links.arrived(key):
            for p in list(self._pending):       # this rank would wait anyway: update meanwhile
                if self._update_ready(p):
                    self._finish_update(p)
        return self.links.recv(key, str(op))

    def _count(self, micro_batches) -> int:
        try:
            return len(micro_batches)
        except TypeError:
            raise TypeError("micro_batches must have a length (a list, or a DataLoader): the schedule "
                            "is planned for a known number of micro-batches") from None

    def _fetch(self, mb):
        while self._next_item <= mb:
            try:
                self._items[self._next_item] = next(self._source)
            except StopIteration:
                raise ValueError(f"micro_batches yielded {self._next_item} items but its length "
                                 f"said {self._count_items}") from None
            self._next_item += 1
        return self._items[mb]

    def _inputs(self, mb, keep_target: bool) -> tuple:
        inputs = self._fetch(mb)[0]
        if not keep_target:
            del self._items[mb]
        inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        return tuple(x.to(self.device) for x in inputs)

    def _target(self, mb):
        target = self._fetch(mb)[1]
        if not self.cfg.recompute:
            del self._items[mb]
        return _to(target, self.device)

    def _target_kept(self, mb):
        target = self._items.pop(mb)[1]
        return _to(target, self.device)


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
