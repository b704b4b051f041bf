"""What a point-to-point message looks like on the wire: the metadata codec and the casts.

* **Metadata** (`encode_metadata` / `decode_metadata`): a list of ints describing a tuple of
  tensors, so the receiver can post receives of the right dtypes and shapes:
  [count, then per tensor: dtype code, dtype code on arrival, requires_grad, ndim, *shape].
* **Wire casts** (`Wire`, for `wire_dtype` null | fp16 | bf16): every float32/float64 tensor
  of a message travels in the wire dtype and is cast back to its own dtype on arrival
  (activations and gradients alike). On an fp16 wire each such tensor is first multiplied
  by 2^k, the power of two that puts its largest magnitude in [2^13, 2^14) (fp16 tops at
  65504): nothing overflows, small gradients keep fp16's full precision, and 2^-k undoes it
  on arrival (k travels with the message, |k| <= 120). A tensor holding inf or NaN travels
  unscaled (inf stays inf: the loss scaler must see it). The casts are deterministic: the
  same tensor gives the same bits on every rank, and in the oracle (`Wire.across`).
"""
from __future__ import annotations


import torch

from ..config import WIRE_DTYPES

REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}
CAST_ON_WIRE = (torch.float32, torch.float64)
FP16_TARGET_EXPONENT = 14       # largest magnitude lands in [2^13, 2^14)
MAX_WIRE_EXPONENT = 120         # 2^±120 is exact in float32

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]



def encode_metadata(tensors: tuple[torch.Tensor, ...], restore: list[torch.dtype] | None = None,
                    requires_grad: list[bool] | None = None) -> list[int]:
    """[count, then per tensor: dtype code, dtype code on arrival, requires_grad, ndim,
    *shape]. `restore` (default: the tensors' dtypes) and `requires_grad` (default: the
    tensors' flags) describe what the receiver makes of each tensor."""
    restore = restore or [t.dtype for t in tensors]
    requires_grad = requires_grad or [t.requires_grad for t in tensors]
    meta = [len(tensors)]
    for t, dtype, flag in zip(tensors, restore, requires_grad):
        for d in (t.dtype, dtype):
            if d not in DTYPES:
                raise TypeError(f"cannot send a tensor of dtype {d}; supported: {DTYPES}")
        meta += [DTYPES.index(t.dtype), DTYPES.index(dtype), int(flag), t.dim(), *t.shape]
    return meta


def decode_metadata(meta: list[int]) -> list[tuple[torch.dtype, torch.dtype, bool, tuple[int, ...]]]:
    """Per tensor: (dtype on the wire, dtype on arrival, requires_grad, shape)."""
    out, i = [], 1
    for _ in range(meta[0]):
        dtype, restore, requires_grad, ndim = meta[i:i + 4]
        out.append((DTYPES[dtype], DTYPES[restore], bool(requires_grad), tuple(meta[i + 4:i + 4 + ndim])))
        i += 4 + ndim
    return out


class Wire:
    """Casts of point-to-point messages (module docstring). `encode` returns the tensors
    to send and, per sent tensor, the dtype to restore on arrival; `decode` inverts it."""

    def __init__(self, dtype: str | None):
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be fp16, bf16 or null, got {dtype!r}")
        self.name = dtype
        self.dtype = REDUCED.get(dtype)

    def encode(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], list[torch.dtype]]:
        if self.dtype is None:
            return tensors, [t.dtype for t in tensors]
        out, exponents = [], []
        for t in tensors:
            k = torch.zeros((), dtype=torch.int32, device=t.device)
            if t.dtype in CAST_ON_WIRE:
                if self.dtype == torch.float16:
                    k = _fp16_exponent(t)
                    t = t * _power_of_two(k, t.dtype)
                t = t.to(self.dtype)
            out.append(t)
            exponents.append(k)
        restore = [t.dtype for t in tensors]
        if self.dtype == torch.float16:
            out.append(torch.stack(exponents) if exponents else torch.zeros(0, dtype=torch.int32))
            restore.append(torch.int32)
        return tuple(out), restore

    def decode(self, tensors, restore: list[torch.dtype]) -> tuple[torch.Tensor, ...]:
        if self.dtype is None:
            return tuple(tensors)
        exponents = None
        if self.dtype == torch.float16:
            exponents, tensors, restore = tensors[-1], tensors[:-1], restore[:-1]
        out = []
        for i, (t, dtype) in enumerate(zip(tensors, restore)):
            if t.dtype != dtype:
                t = t.to(dtype)
                if exponents is not None:
                    t = t * _power_of_two(-exponents[i], dtype)
            out.append(t)
        return tuple(out)

    def roundtrip(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """What the receiver gets for `tensors`."""
        return self.decode(*self.encode(tensors))

    def across(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`tensors` carried across a device boundary inside one autograd graph (the
        oracle): values round-trip forward, and the gradients round-trip backward, each
        tensor on its own, as the engine's gradient messages do."""
        if self.dtype is None:
            return tensors
        return _Across.apply(self, *tensors)


class _Across(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wire, *tensors):
        ctx.wire = wire
        out = wire.roundtrip(tuple(t.detach() for t in tensors))
        ctx.mark_non_differentiable(*[o for o, t in zip(out, tensors) if not t.requires_grad])
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(ctx.wire.roundtrip((g,))[0] if g is not None and needed else None
                        for g, needed in zip(grads, ctx.needs_input_grad[1:])))


def _fp16_exponent(t: torch.Tensor) -> torch.Tensor:
    """k (an int32 scalar on t's device, computed there: no host sync) such that max|t| x 2^k
    lies in [2^13, 2^14), within +-MAX_WIRE_EXPONENT; 0 for an empty, zero or non-finite t."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=t.device)
    largest = t.detach().abs().amax()
    k = (FP16_TARGET_EXPONENT - torch.frexp(largest).exponent).clamp(-MAX_WIRE_EXPONENT, MAX_WIRE_EXPONENT)
    return torch.where(torch.isfinite(largest) & (largest != 0), k, 0).to(torch.int32)


def _power_of_two(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^k exactly, as a scalar of `dtype` (float32 or float64) on k's device, |k| <= 120:
    the exponent field written directly (a power function might round)."""
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)
