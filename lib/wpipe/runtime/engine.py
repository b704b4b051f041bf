"""Runs one device's op list: the only interpreter of a schedule.

Every rank builds its own partitions, checks the schedule, then walks its device's ops
(docs/design.md §6.1):

* F: take the inputs (micro-batch data for partition 0, else the previous partition's
  output), run the partition on the weights version its period uses, stash what the
  backward needs (memory.py), send the outputs on (or compute the loss on the last
  partition);
* B: backward from the loss (scaled by 1/m) or from the received output gradients (after
  a recomputation, recompute.py), send the input gradients back;
* U: start the group's update (updates.py); it finishes when this rank would otherwise
  wait for a message, or at the latest before the partition's next op that needs it (a
  backward, or an op on the version it makes: a stale partition's next forwards overlap it).

The ranks around it are one `Transport` (transport.py): the real links over process groups
(`distributed.connect`), or the probe's loopback. Failures are re-raised naming rank, step
and op with the grid; waits time out naming who waited for what. With `cfg.trace`, every
op's compute and every wait is recorded (trace.py). `cfg.precision` and `cfg.wire_dtype`
follow precision.py: forwards under autocast, the loss in fp32, and with fp16 the loss
scale of the micro-batch's period and the agreed skip of an update whose gradients
overflowed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from .. import schedule
from ..config import PipelineConfig
from ..errors import CommError
from ..schedule import Topology, last_uses
from ..schedule.check import checked_schedule, locate
from ..schedule.messages import incoming
from ..trace import CALL, COMPUTE, RECOMPUTE, TRAIN, WAIT, WAIT_SENDS, Recorder, span_name
from . import memory, precision, recompute
from .ddp import ReplicatedForward
from .distributed import connect
from .feed import Feed, count
from .transport import Transport
from .updates import Updates
from .versions import WeightVersions


class Pipeline:
    """One rank's part of a pipeline-parallel (and data-parallel) training run.

    Call on every rank after torch.distributed is initialised (`init_distributed`).
    `build_partition(i)` is called only for this rank's partitions; `make_optimizer(params)`
    once per local partition; `make_lr_scheduler(optimizer)`, if given, is stepped after
    every update of that partition. `transport` (default: the process group's links) is
    what the rank talks to; probe mode passes a loopback.Loopback (one device alone).
    `on_nonfinite(partition, versions, grads)`, if given, is asked about an update whose
    gradients are not finite (checked with one host sync per update; fp16's loss scaler
    skips those itself): False skips the step, or it raises to stop.
    """

    def __init__(self, build_partition: Callable[[int], nn.Module], loss_fn: Callable,
                 make_optimizer: Callable, cfg: PipelineConfig, *,
                 make_lr_scheduler: Callable | None = None, transport: Transport | None = None,
                 on_nonfinite: Callable | None = None):
        cfg.validate()
        self.cfg = cfg
        self.topology = Topology.from_config(cfg)
        self.trace = Recorder(cfg.trace)
        self.transport = transport if transport is not None else connect(cfg, self.topology, self.trace)
        place = self.transport.place
        self.rank, self.replica, self.device_index, self.device = (place.rank, place.replica,
                                                                   place.device_index, place.device)
        self.trace.time_on(self.device, synchronize=self.transport.synchronize_ops)
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
        method = schedule.get_method(cfg.method)
        scaler = self.precision.make_scaler(cfg.method, cfg.pipeline_depth)
        self.scaler = self.transport.agreement(scaler) if scaler else None
        mean, self.replicated = self.transport.mean, None
        if mean is not None and self.num_partitions == 1 and not method.stale(0, cfg.pipeline_depth):
            # The whole model, synchronous (data_parallel): DDP averages in the backward (ddp.py).
            self.replicated, mean = ReplicatedForward(self.local_partitions[0], mean.group, cfg.period), None
        self.updates = Updates(self.versions, self.lr_schedulers, mean, self.scaler,
                               {p: precision.group_of(method.stale(p, cfg.pipeline_depth)) for p in self.versions},
                               self.trace, on_nonfinite)
        self.stash = memory.Stash()
        self._periods_done = 0   # periods trained by earlier calls of train()

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
        self._feed = Feed(micro_batches, self.device)
        full = self._plan(self._feed.count)
        periods = self._feed.count // self._period
        self._local: dict[tuple, tuple] = {}
        self._updates_started = {p: 0 for p in self.versions}
        self._updates_done = [0] * periods
        self._loss_sum = [0.0] * periods
        self._on_period = on_period
        for module in self.local_partitions.values():
            module.train()
        self.transport.expect(incoming(full, self.topology, self.device_index))
        with self.trace.span(CALL, TRAIN, {"micro_batches": self._feed.count}):
            self._run(full, {"F": self._forward, "B": self._backward, "U": self._update})
            with self.trace.span(WAIT, WAIT_SENDS):
                self.transport.finish()
        self.trace.resolve()
        self._periods_done += periods
        return [float(s) / self._period for s in self._loss_sum] if self.computes_loss else []

    def evaluate(self, micro_batches: Iterable) -> list[tuple]:
        """Forward-only pipelined pass on the newest weights, modules in eval mode.
        Returns (output of the last partition, target) per micro-batch on the loss rank,
        [] elsewhere. Any number of micro-batches; the last may be smaller."""
        total, period = count(micro_batches), self.cfg.period
        padded = math.ceil(total / period) * period
        full = [[op for op in ops if op.kind == "F" and op.micro_batch < total]
                for ops in schedule.build_schedule(self.cfg.method, self.cfg.pipeline_depth, padded, period)]
        self._feed, self._local, self._outputs = Feed(micro_batches, self.device), {}, []
        modes = {p: m.training for p, m in self.local_partitions.items()}
        for module in self.local_partitions.values():
            module.eval()
        try:
            self.transport.expect(incoming(full, self.topology, self.device_index))
            with torch.no_grad():
                self._run(full, {"F": self._forward_eval})
            self.transport.finish("end of evaluate")
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
        """Bytes this rank's runtime held (memory.py): peak weights incl. versions, peak
        stashed activations, optimizer state, and the measured process peak; with the
        precision and wire dtype they were measured under."""
        peak, kind = memory.process_peak(self.device)
        return {"rank": self.rank, "replica": self.replica, "device": self.device_index,
                "partitions": sorted(self.local_partitions),
                "weights_bytes": sum(v.peak_bytes for v in self.versions.values()),
                "activations_bytes": self.stash.peak,
                "optimizer_state_bytes": memory.optimizer_state_bytes(v.optimizer for v in self.versions.values()),
                "peak_bytes": peak, "peak_kind": kind,
                "precision": self.cfg.precision, "wire_dtype": self.cfg.wire_dtype}

    def precision_report(self) -> dict:
        """The precision settings, and with fp16 the loss scale's changes ([period, scale],
        periods of the run from 0) and, per scaler group, the updates skipped for overflow."""
        report = {"precision": self.cfg.precision, "wire_dtype": self.cfg.wire_dtype,
                  "p2p_backend": self.transport.p2p_backend, "device": str(self.device)}
        if self.scaler:
            self.scaler.scale(self._periods_done - 1)   # every verdict it needs has arrived
            report.update(loss_scale_changes=self.scaler.scaler.changes(self._periods_done),
                          overflow_skips=self.scaler.scaler.skipped())
        return report

    def trace_events(self) -> list[dict]:
        """This rank's recorded events in Chrome trace-event form (trace.py); only the
        process name when `cfg.trace` is off."""
        return self.trace.chrome_events(self.rank, f"rank {self.rank} (replica {self.replica}, "
                                                   f"device {self.device_index})")

    # ------------------------------------------------------------------ the loop

    def _plan(self, total: int) -> list[list[schedule.Op]]:
        """The schedule of a call of `total` micro-batches, checked, and each local weights
        version's last use in it."""
        cfg = self.cfg
        period = schedule.validate(cfg.method, cfg.pipeline_depth, total, cfg.micro_batches_per_update)
        full = checked_schedule(cfg.method, cfg.pipeline_depth, total, period, self.topology, self.transport.rules)
        self._period = period
        ops = full[self.device_index]
        stale = schedule.get_method(cfg.method).stale
        for p, versions in self.versions.items():
            last_use = last_uses(ops, p, lambda mb, p=p: self._version(p, mb))
            if stale(p, cfg.pipeline_depth):
                # The next call's first period runs on the version before the newest.
                last_use[self._periods_done + total // period - 1] = len(ops)
            versions.plan(last_use)
        return full

    def _run(self, full, handlers) -> None:
        """Run this device's ops of `full`, then the updates still pending. A failure is
        re-raised naming the op that failed (`self._doing`: an update that runs while
        another op waits is named itself) with the grid."""
        ops = full[self.device_index]
        try:
            for i, op in enumerate(ops):
                self._doing = (i, op)
                if op.partition in self.updates.pending and self._needs_update(op):
                    self._finish_update(op.partition)
                with torch.profiler.record_function(str(op)):
                    handlers[op.kind](i, op)
            for p in list(self.updates.pending):
                self._finish_update(p)
        except CommError:
            raise
        except Exception as error:
            i, op = self._doing
            raise RuntimeError(f"rank {self.rank} (replica {self.replica}, device {self.device_index}), "
                               f"step {i}, op {op}: {type(error).__name__}: {error}\n"
                               f"{locate(full, self.device_index, i)}") from error

    def _forward(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        inputs = self._inputs(op)
        with self.trace.span(COMPUTE, op):
            version = self._version(p, mb)
            weights = self.versions[p].weights(version)
            rng, saved = None, {}
            if self.cfg.recompute:
                # Built with autograd (then dropped) so that the outputs say which of them
                # need gradients; the peak is the same as when it is recomputed.
                rng = recompute.rng_state(self.device)
                with self.precision.autocast():
                    out = self._call(p, weights, inputs)
            else:
                with memory.count_saved(saved, [*self._weights(p, weights), *inputs]), self.precision.autocast():
                    out = self._call(p, weights, inputs, mb)
            outputs = out if isinstance(out, tuple) else (out,)
            loss = None
            if p == self.last_partition:
                loss = self.loss_fn(self.precision.loss_input(out), self._feed.target(mb, keep=self.cfg.recompute))
                self._loss_sum[mb // self._period] += loss.detach()
            del out
        if p != self.last_partition:    # after the span: it holds the op's compute alone
            self._send(("F", p, mb), p + 1, outputs)
        keep = not self.cfg.recompute
        self.stash.put((p, mb), memory.Stashed(inputs, outputs if keep else None, loss if keep else None,
                                               version, rng, sum(saved.values()) + memory.nbytes(inputs)))

    def _backward(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        entry = self.stash.take((p, mb))
        outputs, loss = entry.outputs, entry.loss
        if self.cfg.recompute:   # before the gradients are needed: it overlaps their transfer
            with self.trace.span(COMPUTE, span_name(RECOMPUTE, op)):
                outputs, loss = self._recompute(p, mb, entry)
        grads = None if p == self.last_partition else self._receive(("B", p + 1, mb), p + 1, op)
        with self.trace.span(COMPUTE, op):
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
        self.stash.release(entry)

    def _update(self, i, op) -> None:
        p = op.partition
        t = self._updates_started[p]
        self._updates_started[p] += 1
        self.updates.start(op, i, t, self._periods_done + t, self._version(p, t * self._period))

    def _needs_update(self, op) -> bool:
        """Whether `op` needs its partition's pending update first: a backward (it starts the
        next period's gradients) or an op on the version the update makes. A stale
        partition's next forwards run on the version before: the update (its all-reduce)
        overlaps them (docs/design.md §6.3)."""
        return op.kind != "F" or self._version(op.partition, op.micro_batch) > self.versions[op.partition].newest

    def _finish_update(self, p) -> None:
        running = self._doing
        self._doing = (self.updates.pending[p].index, self.updates.pending[p].op)
        t = self.updates.finish(p).period
        self._updates_done[t] += 1
        if self._updates_done[t] == len(self.versions) and self._on_period is not None:
            self._on_period(t, float(self._loss_sum[t]) / self._period if self.computes_loss else None)
        self._doing = running

    def _forward_eval(self, i, op) -> None:
        p, mb = op.partition, op.micro_batch
        inputs = self._inputs(op)
        with self.precision.autocast():
            out = self._call(p, None, inputs)
        if p == self.last_partition:
            self._outputs.append((self.precision.loss_input(out), self._feed.take(mb)[1]))
        else:
            self._send(("F", p, mb), p + 1, out if isinstance(out, tuple) else (out,))

    # ------------------------------------------------------------------ helpers

    def _version(self, p: int, micro_batch: int) -> int:
        """Weights version (updates since the start) that micro-batch `micro_batch` of
        the current call runs on. Calls of train() continue one run: the period count
        goes on, so a stale partition's first period in a call runs on W(t-1)."""
        return schedule.weights_version(self.cfg.method, p, self.cfg.pipeline_depth,
                                        self._periods_done * self._period + micro_batch, self._period)

    def _weights(self, p, weights) -> Iterable[torch.Tensor]:
        return weights.values() if weights else self.local_partitions[p].parameters()

    def _call(self, p, weights, inputs, mb: int | None = None):
        """Partition p's forward on `weights` (None: the newest, the module's own); through
        DDP (`replicated`) when the forward is micro-batch `mb`'s for its backward."""
        if weights is None and mb is not None and self.replicated is not None:
            return self.replicated(mb, inputs)
        module = self.local_partitions[p]
        return module(*inputs) if weights is None else functional_call(module, weights, inputs)

    def _recompute(self, p, mb, entry):
        """The forward again with autograd, as the first time (recompute.as_before)."""
        weights, saved = self.versions[p].weights(entry.version), {}
        with recompute.as_before(self.local_partitions[p], entry.rng, self.device):
            with memory.count_saved(saved, [*self._weights(p, weights), *entry.inputs]), self.precision.autocast():
                out = self._call(p, weights, entry.inputs, mb)
        self.stash.working_set(sum(saved.values()))
        loss = (self.loss_fn(self.precision.loss_input(out), self._feed.target(mb))
                if p == self.last_partition else None)
        return (out if isinstance(out, tuple) else (out,)), loss

    def _inputs(self, op) -> tuple:
        """A forward's inputs: the micro-batch's data on partition 0, else the previous
        partition's outputs."""
        if op.partition == 0:
            return self._feed.inputs(op.micro_batch, keep_target=self.computes_loss)
        return self._receive(("F", op.partition - 1, op.micro_batch), op.partition - 1, op)

    def _send(self, key, to_partition: int, tensors: tuple) -> None:
        if self.topology.device_of(to_partition) == self.device_index:  # wpipe with depth 1
            self._local[key] = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        else:
            self.transport.send(key, tensors)

    def _receive(self, key, from_partition: int, op) -> tuple:
        if self.topology.device_of(from_partition) == self.device_index:
            return self._local.pop(key)
        if self.updates.pending and not self.transport.arrived(key):
            for p in list(self.updates.pending):       # this rank would wait anyway: update meanwhile
                if self.updates.ready(p):
                    self._finish_update(p)
        return self.transport.recv(key, str(op))
