"""Weight versions of one partition (docs/design.md §6.2).

The module's own parameters always hold the newest version (what the optimizer steps
and what `Pipeline.local_partitions` exposes). An older version is kept only while some
op still needs it: a stale partition's (wpipe's first group, every 2BW stage) forwards of
period t+1 run on version t before update t makes version t+1, and their backwards need
version t afterwards.

No tensor that autograd saved is ever changed in place. When the newest version is still
needed after an update, its parameter tensors are moved, untouched, into the stash, and
the update is applied to fresh copies that take their place in the module and in the
optimizer (whose state moves with them). So a stale partition holds two versions only
between its update and the last backward on the older one, and a synchronous one never
holds two.
"""
from __future__ import annotations

import torch
from torch import nn


class WeightVersions:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module = module
        self.optimizer = optimizer
        self.newest = 0                                  # updates applied so far
        self.stash: dict[int, dict[str, torch.Tensor]] = {}
        self.last_use: dict[int, int] = {}
        self.peak_bytes = self.nbytes()

    def plan(self, last_use: dict[int, int]) -> None:
        """Set, for the coming op list, the index of each version's last use."""
        self.last_use = last_use

    def weights(self, version: int) -> dict[str, torch.Tensor] | None:
        """The tensors of `version`, or None when it is the newest (use the module as is)."""
        if version == self.newest:
            return None
        if version not in self.stash:
            raise RuntimeError(f"weights version {version} is gone (newest {self.newest}, kept "
                               f"{sorted(self.stash)}): the schedule uses a version after its last planned use")
        return self.stash[version]

    def gradients(self, version: int) -> list[torch.Tensor]:
        """Accumulated gradients of `version`, aligned with module.named_parameters();
        zeros for parameters that got none."""
        tensors = dict(self.module.named_parameters()) if version == self.newest else self.stash[version]
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors.values()]

    def update(self, grads: list[torch.Tensor], index: int, step: bool = True) -> None:
        """Make version newest+1 = optimizer step of the newest version with `grads`
        (without `step`: the newest version unchanged, as a skipped fp16 update).
        `index` is the update's position in the op list (to know what is still needed)."""
        self.stash = {v: w for v, w in self.stash.items() if self.last_use.get(v, -1) > index}
        params = dict(self.module.named_parameters())
        if self.last_use.get(self.newest, -1) > index:
            self.stash[self.newest] = params
            params = self._replace_parameters(params)
        for tensors in [params, *self.stash.values()]:
            for t in tensors.values():
                t.grad = None
        if step:
            for param, grad in zip(params.values(), grads):
                param.grad = grad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.newest += 1
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def _replace_parameters(self, old: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """Put fresh copies in the module and the optimizer in place of `old`."""
        fresh = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in old.values()}
        for module in self.module.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in fresh:
                    module._parameters[name] = fresh[id(p)]
        for group in self.optimizer.param_groups:
            group["params"] = [fresh.get(id(p), p) for p in group["params"]]
        for p in old.values():
            if p in self.optimizer.state:
                self.optimizer.state[fresh[id(p)]] = self.optimizer.state.pop(p)
        return dict(self.module.named_parameters())

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: newest weights (in the module's own
        state dict, buffers included), older versions still needed, optimizer state."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "newest": self.newest,
                "stash": {v: {name: t.detach().clone() for name, t in w.items()} for v, w in self.stash.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.newest = state["newest"]
        device = next(self.module.parameters()).device
        self.stash = {v: {name: t.to(device).requires_grad_() for name, t in w.items()}
                      for v, w in state["stash"].items()}

    def nbytes(self) -> int:
        """Bytes of all versions held now (the module's parameters plus the stash)."""
        seen, total = set(), 0
        for tensors in [dict(self.module.named_parameters()), *self.stash.values()]:
            for t in tensors.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total
