"""Training loops against hand-computed iterations: GD, heavy ball, Nesterov, SGD batch order."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradcourse.losses import mse
from gradcourse.models import MLP
from gradcourse.train import Diverged, History, evaluate, grad_norm, lr_factor, minibatches, train

F64 = torch.float64


def least_squares(n: int = 12, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    model = MLP(d, [], 1, activation="linear", bias=False, seed=seed, dtype=F64)
    return model, X, y


def weights(model: nn.Module) -> torch.Tensor:
    return model.layers[0].weight.detach().reshape(-1).clone()


# ----------------------------------------------------------------------------- GD and momentum


def test_gd_matches_closed_form_least_squares_iteration():
    """w_{t+1} = w_t - lr X^T (X w_t - y) / n: the gradient of C = 1/(2n) ||X w - y||^2."""
    model, X, y = least_squares()
    w = weights(model)
    lr, steps, n = 0.3, 25, len(X)
    expected_losses = []
    for _ in range(steps):
        r = X @ w - y
        expected_losses.append(0.5 * float(r @ r) / n)
        w = w - lr * X.T @ r / n
    r = X @ w - y
    expected_losses.append(0.5 * float(r @ r) / n)

    history = train(model, X, y, loss="mse", lr=lr, steps=steps, progress=False)
    torch.testing.assert_close(weights(model), w, rtol=1e-12, atol=1e-14)
    assert history.step == list(range(steps + 1))
    np.testing.assert_allclose(history.loss, expected_losses, rtol=1e-12)
    assert history.accuracy == [] and history.diverged is None


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_momentum_matches_heavy_ball_recursion(nesterov, weight_decay):
    """torch.optim.SGD's recursion: v_{t+1} = mu v_t + g_t + wd w_t, w_{t+1} = w_t - lr v_{t+1}
    (Nesterov: w_{t+1} = w_t - lr (g_t + wd w_t + mu v_{t+1}))."""
    model, X, y = least_squares(seed=1)
    w, v = weights(model), torch.zeros(X.shape[1], dtype=F64)
    lr, mu, steps, n = 0.1, 0.9, 30, len(X)
    for _ in range(steps):
        g = X.T @ (X @ w - y) / n + weight_decay * w
        v = mu * v + g
        w = w - lr * (g + mu * v if nesterov else v)
    train(
        model,
        X,
        y,
        lr=lr,
        momentum=mu,
        nesterov=nesterov,
        weight_decay=weight_decay,
        steps=steps,
        progress=False,
    )
    torch.testing.assert_close(weights(model), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_schedule_scales_each_update(schedule):
    """Update t of T uses lr * factor(t): checked against the recursion run by hand with the
    schedule's factors written out (Paul et al.'s x0.2 at 30/60/80% of the run; cosine)."""
    model, X, y = least_squares(seed=2)
    w, v = weights(model), torch.zeros(X.shape[1], dtype=F64)
    lr, mu, steps, n = 0.1, 0.9, 20, len(X)
    for t in range(steps):
        if schedule == "step":
            factor = 1.0 if t < 6 else 0.2 if t < 12 else 0.04 if t < 16 else 0.008
        else:
            factor = (1 + math.cos(math.pi * t / steps)) / 2
        g = X.T @ (X @ w - y) / n
        v = mu * v + g
        w = w - lr * factor * (g + mu * v)
    train(
        model,
        X,
        y,
        lr=lr,
        momentum=mu,
        nesterov=True,
        steps=steps,
        schedule=schedule,
        progress=False,
    )
    torch.testing.assert_close(weights(model), w, rtol=1e-12, atol=1e-14)


def test_schedule_is_checked():
    model, X, y = least_squares()
    with pytest.raises(ValueError, match="schedule must be one of"):
        train(model, X, y, lr=0.1, steps=2, schedule="linear", progress=False)
    assert lr_factor("constant", 5, 10) == 1.0 and lr_factor("cosine", 10, 10) == 0.0


def test_epochs_for_gd_are_steps():
    model, X, y = least_squares()
    history = train(model, X, y, lr=0.1, epochs=5, progress=False)
    assert history.step == list(range(6))


# ----------------------------------------------------------------------------- SGD


def test_minibatches_deterministic_and_each_epoch_visits_every_example_once():
    n, b = 10, 4
    it, again, other = minibatches(n, b, seed=3), minibatches(n, b, seed=3), minibatches(n, b)
    first = [next(it) for _ in range(9)]  # 3 epochs of sizes 4, 4, 2
    assert [len(i) for i in first] == [4, 4, 2] * 3
    assert all(torch.equal(a, next(again)) for a in first)
    assert not all(torch.equal(a, next(other)) for a in first)
    epochs = [torch.cat(first[3 * e : 3 * e + 3]) for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


class Recorder(nn.Module):
    """A linear model that records which examples (stored in column 0 as their index) it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1, dtype=F64)
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, 0].long().tolist())
        return self.linear(x[:, 1:])


def test_sgd_uses_the_seeded_batch_order():
    n, b, epochs = 10, 4, 3
    x = torch.stack([torch.arange(n, dtype=F64), torch.linspace(-1, 1, n, dtype=F64)], dim=1)
    y = torch.zeros(n, dtype=F64)
    runs = []
    for seed in (5, 5, 6):
        model = Recorder()
        history = train(
            model,
            x,
            y,
            lr=0.01,
            optimizer="sgd",
            batch_size=b,
            epochs=epochs,
            seed=seed,
            progress=False,
        )
        assert history.step == list(range(9 + 1))
        runs.append(model.seen[:9])  # the 10th forward is the loss at the final step
    order = [torch.tensor(i) for i in runs[0]]
    assert all(torch.equal(a, c) for a, c in zip(order, minibatches(n, b, seed=5), strict=False))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for e in range(epochs):
        visited = sum(runs[0][3 * e : 3 * e + 3], [])
        assert sorted(visited) == list(range(n))


def test_sgd_steps_may_cross_epochs():
    model, X, y = least_squares(n=10)
    history = train(model, X, y, lr=0.05, optimizer="sgd", batch_size=3, steps=7, progress=False)
    assert history.step == list(range(8)) and all(math.isfinite(v) for v in history.loss)


# ----------------------------------------------------------------------------- divergence


def one_dim_problem(lr: float):
    """x = 1, y = 0, w_0 = 1: w_{t+1} = (1 - lr) w_t, loss_t = w_t^2 / 2; the first step with
    a non-finite loss, computed with Python floats (IEEE float64, as the model)."""
    model = MLP(1, [], 1, activation="linear", bias=False, dtype=F64)
    with torch.no_grad():
        model.layers[0].weight.fill_(1.0)
    w, step = 1.0, 0
    while math.isfinite(0.5 * (w * w)):  # the order of operations of losses.mse
        w, step = w - lr * w, step + 1
    return model, torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64), step


def test_too_large_lr_raises_diverged_with_step_and_lr():
    model, x, y, step = one_dim_problem(2.5)  # |1 - lr| = 1.5 > 1: unstable
    model.eval()
    with pytest.raises(Diverged) as info:
        train(model, x, y, lr=2.5, steps=5000, progress=False)
    assert not model.training  # mode restored on the way out
    err = info.value
    assert (err.step, err.lr, err.loss) == (step, 2.5, math.inf)
    assert str(err) == f"training diverged at step {step} (lr=2.5): loss is inf"
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.step, clone.lr, str(clone)) == (err.step, err.lr, str(err))


def test_divergence_recorded_without_raising():
    model, x, y, step = one_dim_problem(2.5)
    history = train(model, x, y, lr=2.5, steps=5000, progress=False, raise_on_divergence=False)
    assert isinstance(history.diverged, Diverged) and history.diverged.step == step
    assert history.step == list(range(step)) and len(history) == step
    assert math.isfinite(history.final_loss) and history.wall_time > 0


def test_divergence_at_the_last_step_is_caught():
    model, x, y, step = one_dim_problem(1e10)
    with pytest.raises(Diverged) as info:
        train(model, x, y, lr=1e10, steps=step, progress=False)
    assert info.value.step == step


# ----------------------------------------------------------------------------- callbacks, stopping


@pytest.mark.parametrize(("every", "expected"), [(3, [0, 3, 6, 9, 10]), (5, [0, 5, 10])])
def test_callback_called_at_step_zero_every_and_last(every, expected):
    model, X, y = least_squares()
    calls = []

    def callback(step, m):
        calls.append(step)
        return {"w0": float(m.layers[0].weight[0, 0].detach())} if step % 2 == 0 else None

    history = train(model, X, y, lr=0.1, steps=10, every=every, callback=callback, progress=False)
    assert calls == expected
    assert [r["step"] for r in history.records] == [s for s in expected if s % 2 == 0]
    arrays = history.record_arrays()
    assert set(arrays) == {"step", "w0"} and len(arrays["w0"]) == len(history.records)


def test_callback_sees_the_parameters_of_its_step():
    model, X, y = least_squares()
    lr, n = 0.2, len(X)
    w, expected = weights(model), {}
    for t in range(7):
        expected[t] = w
        w = w - lr * X.T @ (X @ w - y) / n
    history = train(
        model, X, y, lr=lr, steps=6, callback=lambda t, m: {"w": weights(m)}, progress=False
    )
    for record in history.records:
        torch.testing.assert_close(record["w"], expected[record["step"]], rtol=1e-12, atol=0)


def test_callback_must_return_dict_or_none():
    model, X, y = least_squares()
    with pytest.raises(TypeError, match="callback"):
        train(model, X, y, lr=0.1, steps=2, callback=lambda t, m: 1.0, progress=False)


def test_stop_when_stops_early():
    model, X, y = least_squares()
    full = train(least_squares()[0], X, y, lr=0.2, steps=200, progress=False)
    threshold = full.loss[40]
    first = next(s for s, v in zip(full.step, full.loss, strict=True) if v <= threshold)
    calls = []
    history = train(
        model,
        X,
        y,
        lr=0.2,
        steps=200,
        every=1000,
        callback=lambda t, m: calls.append(t),
        stop_when=lambda h: h.loss[-1] <= threshold,
        progress=False,
    )
    assert history.step[-1] == first and len(history) == first + 1
    assert calls == [0, first]  # the callback also runs at the step where training stopped


def test_stop_on_gradient_norm():
    model, X, y = least_squares()
    history = train(
        model,
        X,
        y,
        lr=0.5,
        steps=5000,
        stop_when=lambda h: grad_norm(model, X, y) <= 1e-4,
        progress=False,
    )
    assert history.step[-1] < 5000 and grad_norm(model, X, y) <= 1e-4


# ----------------------------------------------------------------------------- validation and mode


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(optimizer="sgd", batch_size=0), "batch_size"),
        (dict(optimizer="sgd", batch_size=13), "batch_size"),
        (dict(batch_size=4), "optimizer='gd'"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=None, epochs=0), "epochs"),
        (dict(steps=3, epochs=3), "exactly one"),
        (dict(steps=None), "exactly one"),
        (dict(every=0), "every"),
        (dict(log_every=0), "log_every"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(nesterov=True), "nesterov"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(loss="hinge"), "loss"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, name):
    model, X, y = least_squares()
    args = dict(lr=0.1, steps=3, progress=False) | kwargs
    with pytest.raises(ValueError, match=name):
        train(model, X, y, **args)


def test_train_restores_each_module_mode():
    model = MLP(4, [5], 2)
    model.eval()
    model.layers[1].train()
    seen = []
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    train(
        model, x, y, lr=0.1, steps=2, callback=lambda t, m: seen.append(m.training), progress=False
    )
    assert seen == [True, True, True]
    assert not model.training and not model.layers[0].training and model.layers[1].training
    with pytest.raises(ValueError):
        train(model, x, y, lr=-1.0, steps=2, progress=False)
    assert not model.training


def test_progress_false_prints_nothing(capsys):
    model, X, y = least_squares()
    train(model, X, y, lr=0.1, steps=5, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    train(model, X, y, lr=0.1, steps=5, progress=True)
    assert capsys.readouterr().err != ""


# ----------------------------------------------------------------------------- classification


def blobs(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centers[y] + 0.5 * torch.randn(n, 2, generator=g), y


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_classification_records_accuracy_and_learns(loss):
    x, y = blobs()
    model = MLP(2, [16], 3, seed=1)
    history = train(model, x, y, loss=loss, lr=0.2, steps=100, log_every=10, progress=False)
    assert history.step == list(range(0, 101, 10))
    assert len(history.accuracy) == len(history) and history.accuracy[-1] == 1.0
    assert history.loss[-1] < history.loss[0]
    arrays = history.as_arrays()
    assert arrays["step"].dtype == np.int64 and arrays["accuracy"].shape == (11,)
    result = evaluate(model, x, y, loss=loss)
    assert result["accuracy"] == 1.0
    assert result["loss"] == pytest.approx(history.final_loss, rel=1e-5)


def test_float32_data_on_a_float64_model_and_device_argument():
    x, y = blobs()
    model = MLP(2, [8], 3, dtype=F64)
    history = train(model, x, y, loss="ce", lr=0.1, steps=3, device="cpu", progress=False)
    assert len(history) == 4 and model.layers[0].weight.dtype == F64


def test_sgd_does_not_touch_the_global_rng():
    model, X, y = least_squares()
    state = torch.get_rng_state()
    train(model, X, y, lr=0.05, optimizer="sgd", batch_size=5, epochs=2, progress=False)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------- evaluate, grad_norm


def test_evaluate_matches_direct_computation_and_restores_mode():
    model, X, y = least_squares(n=11)
    model.train()
    result = evaluate(model, X, y, batch_size=4)
    with torch.no_grad():
        direct = float(mse(model(X), y))
    assert result["loss"] == pytest.approx(direct, rel=1e-12)
    assert result["accuracy"] is None and model.training


def test_grad_norm_matches_autograd_and_leaves_grad_untouched():
    model, X, y = least_squares(n=11)
    norm = grad_norm(model, X, y)
    assert all(p.grad is None for p in model.parameters())
    assert grad_norm(model, X, y, batch_size=3) == pytest.approx(norm, rel=1e-12)
    w = weights(model)
    assert norm == pytest.approx(float((X.T @ (X @ w - y) / len(X)).norm()), rel=1e-12)


def test_history_helpers():
    history = History()
    assert len(history) == 0 and math.isnan(history.final_loss)
    history.step += [0, 1]
    history.loss += [2.0, 1.0]
    assert len(history) == 2 and history.final_loss == 1.0
    assert set(history.as_arrays()) == {"step", "loss"}


def test_empty_data_is_refused_by_name():
    model, x, y = least_squares()
    with pytest.raises(ValueError, match="x must hold at least one example"):
        train(model, x[:0], y[:0], lr=0.1, steps=3, progress=False)


def test_callback_sees_batchnorm_statistics_before_the_steps_forward_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3) + 5.0, torch.randint(0, 2, (8,))
    seen = {}

    def callback(t, m):
        seen[t] = m[1].running_mean.clone()

    train(model, x, y, loss="ce", lr=0.1, steps=1, progress=False, callback=callback)
    assert torch.equal(seen[0], torch.zeros(4))  # untouched at step 0
    assert not torch.equal(seen[1], torch.zeros(4))  # moved by step 0's forward pass


def test_fresh_sampling_draws_each_batch_anew_uniformly():
    draws = minibatches(6, 2, seed=0, sampling="fresh")
    batches = [next(draws) for _ in range(6_000)]
    assert all(len(b) == 2 and b[0] != b[1] for b in batches)
    # every example is in a batch with probability B/n = 1/3, independently of the epoch
    counts = torch.bincount(torch.cat(batches), minlength=6).double() / 6_000
    assert torch.all((counts - 1 / 3).abs() < 0.03)  # about 5 standard errors
    # unlike epoch sampling, the first three batches need not cover all six examples
    covers = [len(set(torch.cat(batches[i : i + 3]).tolist())) == 6 for i in range(0, 3_000, 3)]
    # a triple covers all six with probability (6/15)(1/15) = 2/75 (epoch sampling: always)
    assert 0.01 < sum(covers) / len(covers) < 0.05  # 2/75 +- 4.5 standard errors
    again = minibatches(6, 2, seed=0, sampling="fresh")
    assert all(torch.equal(next(again), b) for b in batches[:10])
    with pytest.raises(ValueError, match="sampling"):
        next(minibatches(6, 2, sampling="bootstrap"))


def test_train_with_fresh_sampling_uses_those_batches():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(6, 1, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().clone()
    train(model, x, y, lr=0.1, optimizer="sgd", batch_size=2, steps=3, sampling="fresh",
                progress=False)  # fmt: skip
    w = start.clone()
    for idx in list(itertools.islice(minibatches(6, 2, seed=0, sampling="fresh"), 3)):
        xb, yb = x[idx], y[idx]
        grad = ((xb @ w.T - yb) * xb).mean(0, keepdim=True)  # 1/2 mean squared error
        w = w - 0.1 * grad
    torch.testing.assert_close(model.weight.detach(), w)
