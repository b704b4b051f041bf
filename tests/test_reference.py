"""The oracle (`wpipe.reference.train`) against arithmetic written out by hand.

Synchronous methods must equal plain gradient accumulation; the stale rules of wpipe and
pipedream_2bw are spelled out step by step (docs/design.md §5). Every
parameter is compared by name; a failure names the partition, the parameter and the
largest difference. All float64, so "equal" means 1e-12.
"""
import copy

import pytest
import torch
from torch import nn

from wpipe.runtime import reference

import toy

WIDTH, OUT, TOL = 4, 2, 1e-12


def mlp(num_partitions: int, seed: int = 1, batch_norm: bool = False) -> list[nn.Module]:
    """A float64 MLP cut into plain modules: Linear-Tanh blocks, the last one Linear only.
    With `batch_norm`, the first block is Linear-BatchNorm-Tanh."""
    torch.manual_seed(seed)
    parts = []
    for p in range(num_partitions):
        if p == num_partitions - 1:
            parts.append(nn.Sequential(nn.Linear(WIDTH, OUT)))
        else:
            norm = [nn.BatchNorm1d(WIDTH)] if batch_norm and p == 0 else []
            parts.append(nn.Sequential(nn.Linear(WIDTH, WIDTH), *norm, nn.Tanh()))
    return [part.double() for part in parts]


def data(count: int, replica: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + replica)
    return [(torch.randn(3, WIDTH, generator=g, dtype=torch.float64),
             torch.randn(3, OUT, generator=g, dtype=torch.float64)) for _ in range(count)]


def mse(output, target):
    return ((output - target) ** 2).mean()


def forward(parts, inputs):
    x = inputs
    for part in parts:
        x = part(*x) if isinstance(x, tuple) else part(x)
    return x


def sgd(lr=0.1, momentum=0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def accumulate(partitions, replicas, period, make_optimizer, loss_fn=mse, make_lr_scheduler=None):
    """Plain synchronous training by hand: one model and ONE optimizer over all of it; per
    period, the sum of grad(loss / m) over its micro-batches, averaged over the replicas,
    then one step. Each replica keeps its own buffers. Returns (partitions, losses)."""
    models = [copy.deepcopy(list(partitions)) for _ in replicas]
    params = [p for part in models[0] for p in part.parameters()]
    optimizer = make_optimizer(params)
    scheduler = make_lr_scheduler(optimizer) if make_lr_scheduler else None
    losses = []
    for start in range(0, len(replicas[0]), period):
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for model, sequence in zip(models, replicas):
            own = [p for part in model for p in part.parameters()]
            with torch.no_grad():  # every replica computes on replica 0's weights
                for mine, theirs in zip(own, params):
                    mine.copy_(theirs)
            for inputs, target in sequence[start:start + period]:
                loss = loss_fn(forward(model, inputs), target)
                grads = [a + b for a, b in zip(grads, torch.autograd.grad(loss / period, own))]
                total += loss.item()
        for p, g in zip(params, grads):
            p.grad = g / len(replicas)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()
        losses.append(total / (period * len(replicas)))
    return models[0], losses


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item()


def assert_same(got, want, tol=TOL, buffers=False):
    """Every parameter (with `buffers`: every buffer) of every partition, by name."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        gs, ws = (dict(m.named_buffers() if buffers else m.named_parameters()) for m in (g, w))
        assert gs.keys() == ws.keys(), f"partition {i}: {sorted(gs)} != {sorted(ws)}"
        for name in gs:
            diff = max_difference(gs[name].double(), ws[name].double())
            assert diff <= tol, f"partition {i} {name}: max difference {diff:.3g} > {tol:g}"


def assert_differ(got, want, at_least=1e-6):
    for i, (g, w) in enumerate(zip(got, want)):
        diff = max(max_difference(a, b) for a, b in zip(g.parameters(), w.parameters()))
        assert diff > at_least, f"partition {i}: max difference only {diff:.3g}"


# --------------------------------------------------------------------------- synchronous methods

SYNCHRONOUS = [  # (method, depth, micro_batches_per_update, data_parallel, micro-batches per replica)
    ("pipedream_flush", 2, None, 1, 6),
    ("pipedream_flush", 3, 2, 2, 4),
    ("gpipe", 2, None, 1, 6),
    ("gpipe", 3, 4, 2, 8),
    ("data_parallel", 1, None, 1, 3),
    ("data_parallel", 1, None, 2, 3),
    ("data_parallel", 1, 3, 2, 6),
]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method, depth, m, d, count", SYNCHRONOUS)
def test_synchronous_methods_equal_gradient_accumulation(method, depth, m, d, count, optimizer):
    num_parts = 1 if method == "data_parallel" else depth
    parts, initial = mlp(num_parts), mlp(num_parts)
    replicas = [data(count, r) for r in range(d)]
    make_optimizer = toy.OPTIMIZERS[optimizer]
    losses = reference.train(parts, mse, make_optimizer, replicas[0] if d == 1 else replicas, method,
                             depth, micro_batches_per_update=m, data_parallel=d)
    period = m or (1 if method == "data_parallel" else depth)
    want, want_losses = accumulate(initial, replicas, period, make_optimizer)
    assert_same(parts, want)
    assert losses == pytest.approx(want_losses, abs=TOL, rel=0)
    assert_differ(parts, initial, at_least=1e-3)  # it did train


def test_synchronous_on_the_toy_model_passes_tuples():
    # tests/toy.py's partitions take and return (x, scale), the last returns x alone.
    parts = [toy.build_partition(i, 3) for i in range(3)]
    initial = copy.deepcopy(parts)
    batches = [toy.micro_batches(6, r) for r in range(2)]
    losses = reference.train(parts, toy.loss_fn, toy.OPTIMIZERS["adam"], batches, "gpipe", 3,
                             data_parallel=2)
    want, want_losses = accumulate(initial, batches, 3, toy.OPTIMIZERS["adam"], loss_fn=toy.loss_fn)
    assert_same(parts, want)
    assert losses == pytest.approx(want_losses, abs=TOL, rel=0)


def test_losses_are_per_period_means():
    # lr = 0: every loss is taken at the initial weights, so each period's number is the
    # plain mean over its micro-batches and replicas.
    parts = mlp(2)
    replicas = [data(6, 0), data(6, 1)]
    losses = reference.train(parts, mse, sgd(lr=0.0), replicas, "gpipe", 2, micro_batches_per_update=3,
                             data_parallel=2)
    each = [[mse(forward(parts, x), y).item() for x, y in seq] for seq in replicas]
    assert len(losses) == 2
    for t in range(2):
        window = [loss for seq in each for loss in seq[3 * t:3 * t + 3]]
        assert losses[t] == pytest.approx(sum(window) / 6, abs=TOL, rel=0)
    assert losses[0] != pytest.approx(losses[1])


# --------------------------------------------------------------------------- stale methods

def test_wpipe_depth_1_is_its_formula():
    """N = 1: P0 is G0 (stale), P1 is G1 (fresh), a period is one micro-batch, plain SGD:
    W(t+1) = W(t) - lr g_W,  V(t+1) = V(t) - lr g_V,  g = grad L_t at (W(t-1), V(t)),  W(-1) = W(0)."""
    lr, parts = 0.1, mlp(2)
    batches = data(3)

    def loss_at(w, v, x, y):
        hidden = torch.tanh(x @ w["0.weight"].T + w["0.bias"])
        return mse(hidden @ v["0.weight"].T + v["0.bias"], y)

    def run(stale: bool):
        w = {k: p.detach().clone() for k, p in parts[0].named_parameters()}
        v = {k: p.detach().clone() for k, p in parts[1].named_parameters()}
        w_prev, losses = w, []
        for x, y in batches:
            at_w = {k: t.clone().requires_grad_() for k, t in (w_prev if stale else w).items()}
            at_v = {k: t.clone().requires_grad_() for k, t in v.items()}
            loss = loss_at(at_w, at_v, x, y)
            grads = dict(zip([*at_w, *("v" + k for k in at_v)],
                             torch.autograd.grad(loss, [*at_w.values(), *at_v.values()])))
            w_next = {k: w[k] - lr * grads[k] for k in w}
            v_next = {k: v[k] - lr * grads["v" + k] for k in v}
            w_prev, w, v = w, w_next, v_next
            losses.append(loss.item())
        return w, v, losses

    w, v, want_losses = run(stale=True)
    w_sync, _, _ = run(stale=False)
    assert max(max_difference(w[k], w_sync[k]) for k in w) > 1e-6   # the formula is not the synchronous one
    losses = reference.train(parts, mse, sgd(lr), batches, "wpipe", 1)
    for k in w:
        assert max_difference(parts[0].get_parameter(k), w[k]) <= TOL, f"G0 {k}"
        assert max_difference(parts[1].get_parameter(k), v[k]) <= TOL, f"G1 {k}"
    assert losses == pytest.approx(want_losses, abs=TOL, rel=0)


def period_gradient(parts, batches):
    """Sum over `batches` of grad(loss / m) at `parts`, and the mean loss."""
    params = [p for part in parts for p in part.parameters()]
    grads, total = [torch.zeros_like(p) for p in params], 0.0
    for x, y in batches:
        loss = mse(forward(parts, x), y)
        grads = [a + b for a, b in zip(grads, torch.autograd.grad(loss / len(batches), params))]
        total += loss.item()
    return grads, total / len(batches)


@pytest.mark.parametrize("period", [2, 3])
def test_pipedream_2bw_first_update_is_synchronous_second_uses_w0(period):
    """Depth 2, both stages stale, SGD with momentum (its state carries over):
    W(1) = step(W(0), g at W(0) on period 0)   (W(-1) = W(0): a plain synchronous step)
    W(2) = step(W(1), g at W(0) on period 1)."""
    make_optimizer = sgd(lr=0.1, momentum=0.9)
    batches = data(2 * period)
    w0 = mlp(2)
    model = copy.deepcopy(w0)
    optimizer = make_optimizer([p for part in model for p in part.parameters()])
    want_losses = []
    for t in range(2):
        grads, loss = period_gradient(w0, batches[t * period:(t + 1) * period])
        for p, g in zip([p for part in model for p in part.parameters()], grads):
            p.grad = g
        optimizer.step()
        want_losses.append(loss)
        if t == 0:
            w1 = copy.deepcopy(model)

    def train(method, count):
        parts = mlp(2)
        losses = reference.train(parts, mse, make_optimizer, batches[:count], method, 2,
                                 micro_batches_per_update=period)
        return parts, losses

    one, _ = train("pipedream_2bw", period)
    assert_same(one, w1)
    assert_same(one, train("gpipe", period)[0])      # the first update is the synchronous one
    two, losses = train("pipedream_2bw", 2 * period)
    assert_same(two, model)
    assert losses == pytest.approx(want_losses, abs=TOL, rel=0)
    # ... and period 1 really ran on W(0), not W(1).
    _, at_w1 = period_gradient(w1, batches[period:])
    assert abs(losses[1] - at_w1) > 1e-6


def test_wpipe_depth_2_is_stale_only_after_the_first_period():
    """Four partitions, G0 = P0 P1 (BatchNorm in P0), G1 = P2 P3, against gpipe on the same
    four partitions with the same period 2."""
    make_optimizer = toy.OPTIMIZERS["adam"]
    batches = data(4)

    def run(method, depth, count):
        parts = mlp(4, batch_norm=True)
        return parts, reference.train(parts, mse, make_optimizer, batches[:count], method, depth,
                                      micro_batches_per_update=2)

    # Period 0: W(-1) = W(0), so wpipe's update is gpipe's.
    wp1, wp1_losses = run("wpipe", 2, 2)
    gp1, gp1_losses = run("gpipe", 4, 2)
    assert_same(wp1, gp1)
    assert_same(wp1, gp1, buffers=True)
    assert wp1_losses == pytest.approx(gp1_losses, abs=TOL, rel=0)

    # Period 1 runs on (W(0), V(1)): G0's weights go back to W(0) but its BatchNorm
    # statistics (not versioned) go on from where period 0 left them.
    wp2, wp2_losses = run("wpipe", 2, 4)
    gp2, gp2_losses = run("gpipe", 4, 4)
    assert wp2_losses[0] == pytest.approx(gp2_losses[0], abs=TOL, rel=0)
    g0 = copy.deepcopy(gp1[:2])
    for part, w0 in zip(g0, mlp(4, batch_norm=True)):
        for name, param in part.named_parameters():
            param.data.copy_(w0.get_parameter(name))
    _, at_w0_v1 = period_gradient(g0 + gp1[2:], batches[2:])
    assert wp2_losses[1] == pytest.approx(at_w0_v1, abs=TOL, rel=0)
    assert_same(wp2[:2], g0, buffers=True)
    assert abs(wp2_losses[1] - gp2_losses[1]) > 1e-6
    assert_differ(wp2, gp2)   # every partition, G1 included (its gradient saw W(0)'s activations)


# --------------------------------------------------------------------------- buffers, schedulers

@pytest.mark.parametrize("method, depth, d", [
    ("gpipe", 2, 1), ("pipedream_flush", 2, 2), ("data_parallel", 1, 2)])
def test_batch_norm_statistics_equal_sequential_training(method, depth, d):
    def build():   # data_parallel: the whole model, BatchNorm inside, as one partition
        parts = mlp(2, batch_norm=True)
        return [nn.Sequential(*parts)] if method == "data_parallel" else parts

    parts, initial = build(), build()
    replicas = [data(4, r) for r in range(d)]
    make_optimizer = sgd(lr=0.1, momentum=0.9)
    period = 1 if method == "data_parallel" else depth
    reference.train(parts, mse, make_optimizer, replicas[0] if d == 1 else replicas, method, depth,
                    data_parallel=d)
    want, _ = accumulate(initial, replicas, period, make_optimizer)
    assert_same(parts, want)
    assert_same(parts, want, buffers=True)
    bn, bn0 = (next(m for m in ps[0].modules() if isinstance(m, nn.BatchNorm1d))
               for ps in (parts, initial))
    assert bn.num_batches_tracked.item() == 4          # replica 0's micro-batches only
    assert max_difference(bn.running_mean, bn0.running_mean) > 1e-3


@pytest.mark.parametrize("method, depth, count", [
    ("gpipe", 2, 6), ("wpipe", 1, 3), ("pipedream_2bw", 2, 6)])
def test_lr_scheduler_steps_once_per_period_per_partition(method, depth, count):
    made = []

    def make_lr_scheduler(optimizer):
        made.append(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
        return made[-1]

    parts = mlp(2)
    initial = copy.deepcopy(parts)
    make_optimizer = sgd(lr=0.1, momentum=0.9)
    reference.train(parts, mse, make_optimizer, data(count), method, depth,
                    make_lr_scheduler=make_lr_scheduler)
    assert len(made) == 2
    for part, scheduler in zip(parts, made):
        assert scheduler.last_epoch == 3
        assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.5 ** 3])
        owned = {id(p) for group in scheduler.optimizer.param_groups for p in group["params"]}
        assert owned == {id(p) for p in part.parameters()}
    if method == "gpipe":   # and it steps after the optimizer: the first update uses lr 0.1
        want, _ = accumulate(initial, [data(count)], depth, make_optimizer,
                             make_lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
        assert_same(parts, want)


# --------------------------------------------------------------------------- argument errors

def test_wrong_number_of_partitions():
    with pytest.raises(ValueError, match=r"^wpipe at depth 2 needs 4 partitions, got 2$"):
        reference.train(mlp(2), mse, sgd(), data(2), "wpipe", 2)
    with pytest.raises(ValueError, match=r"^gpipe at depth 3 needs 3 partitions, got 2$"):
        reference.train(mlp(2), mse, sgd(), data(3), "gpipe", 3)
    with pytest.raises(ValueError, match=r"^data_parallel at depth 1 needs 1 partitions, got 2$"):
        reference.train(mlp(2), mse, sgd(), data(3), "data_parallel", 1)


def test_mismatched_replica_sequences():
    with pytest.raises(ValueError, match=r"^expected 2 replica sequences of equal length$"):
        reference.train(mlp(1), mse, sgd(), [data(2), data(3)], "data_parallel", 1, data_parallel=2)
    with pytest.raises(ValueError, match=r"^expected 3 replica sequences of equal length$"):
        reference.train(mlp(1), mse, sgd(), [data(2), data(2)], "data_parallel", 1, data_parallel=3)


def test_period_must_divide_the_micro_batches():
    with pytest.raises(ValueError, match=r"num_micro_batches must be a positive multiple of the period "
                                         r"\(micro_batches_per_update = 2\), got 3"):
        reference.train(mlp(2), mse, sgd(), data(3), "gpipe", 2)
    with pytest.raises(ValueError, match=r"micro_batches_per_update must equal depth \(2\) for wpipe"):
        reference.train(mlp(4), mse, sgd(), data(6), "wpipe", 2, micro_batches_per_update=3)
