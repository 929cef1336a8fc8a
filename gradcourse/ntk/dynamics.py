"""Least-squares training under a fixed kernel, in closed form.

Dynamics of least squares, C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2 (:func:`gradcourse.losses.mse`),
for a fixed kernel, i.e. for the linearised network (:func:`gradcourse.ntk.linearize`; Jacot et
al. 2018, section 5; Lee et al. 2019, "Wide neural networks of any depth evolve as linear
models", eq. 9): :func:`kernel_gradient_flow` (time t), :func:`kernel_gradient_descent` (k steps
of rate lr), :func:`kernel_regression` (t -> infinity), and :func:`gradient_descent_mse`, which
diagonalises the training kernel once and returns a function of the time (or step count) and the
initial outputs, in the shape of neural-tangents' ``predict.gradient_descent_mse``.

All go through the eigendecomposition of the training kernel (:class:`_Spectral`): a function
of the eigenvalues (the decay of the residual, and its integral for the test inputs) applied in
the kernel's eigenbasis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_nonnegative, check_number, check_positive

__all__ = [
    "KernelPrediction",
    "kernel_gradient_flow",
    "kernel_gradient_descent",
    "kernel_regression",
    "gradient_descent_mse",
]


@dataclass(frozen=True)
class KernelPrediction:
    """Predicted outputs on the training inputs and (when a test kernel was given) the test
    inputs; with a 1-D tensor of times / steps, a leading dimension indexes them."""

    train: Tensor
    test: Tensor | None


def _as_outputs(name: str, f: Tensor, n: int) -> tuple[Tensor, tuple[int, ...]]:
    """(n,) or (n, ...) -> (n, O) plus the original shape."""
    if not isinstance(f, Tensor) or f.ndim < 1 or f.shape[0] != n:
        got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{name} must be a tensor of shape ({n}, ...) , got {got}")
    return f.reshape(n, -1), tuple(f.shape)


class _Spectral:
    """Eigendecomposition of the training kernel, flattened to (n O, n O) when given as blocks;
    a kernel (n, n) acts on every output alike (Theta (x) I_O)."""

    def __init__(self, ntk_train_train: Tensor, y_train: Tensor) -> None:
        if not isinstance(ntk_train_train, Tensor) or ntk_train_train.ndim not in (2, 4):
            raise ValueError(
                "ntk_train_train must be a tensor of shape (n, n) or (n, n, O, O), got "
                f"{getattr(ntk_train_train, 'shape', type(ntk_train_train).__name__)}"
            )
        k = ntk_train_train
        n = k.shape[0]
        if k.shape[1] != n or (k.ndim == 4 and k.shape[2] != k.shape[3]):
            raise ValueError(f"ntk_train_train must be square, got shape {tuple(k.shape)}")
        self.n, self.blocks = n, k.ndim == 4
        self.dtype, self.device = k.dtype, k.device
        y, self.out_shape = _as_outputs("y_train", y_train, n)
        y = y.to(self.device, self.dtype)  # like f0_* and the test kernel
        self.o = y.shape[1]
        if self.blocks and k.shape[2] != self.o:
            raise ValueError(
                f"y_train must have O = {k.shape[2]} outputs per example to match ntk_train_train "
                f"{tuple(k.shape)}, got shape {tuple(y_train.shape)}"
            )
        flat = k.permute(0, 2, 1, 3).reshape(n * self.o, n * self.o) if self.blocks else k
        self.eigvals, self.eigvecs = torch.linalg.eigh((flat + flat.T) / 2)
        self.y = y

    def vec(self, f: Tensor) -> Tensor:
        """(n, O) -> the layout the eigenvectors act on: (n O, 1) for blocks, (n, O) otherwise."""
        return f.reshape(-1, 1) if self.blocks else f

    def apply(self, g: Tensor, r: Tensor) -> Tensor:
        """V diag(g) V^T r for g (k, m) (k functions of the eigenvalues) -> (k, n, O)."""
        coeffs = self.eigvecs.T @ self.vec(r)  # (m, c)
        out = torch.einsum("im,km,mc->kic", self.eigvecs, g, coeffs)
        return out.reshape(g.shape[0], self.n, self.o)

    def test_kernel(self, ntk_test_train: Tensor) -> Tensor:
        """Theta(test, train) flattened like the training kernel: (m O, n O) or (m, n)."""
        k = ntk_test_train
        ok = isinstance(k, Tensor) and k.ndim == (4 if self.blocks else 2) and k.shape[1] == self.n
        if ok and self.blocks:
            ok = k.shape[2:] == (self.o, self.o)
        if not ok:
            want = f"(m, {self.n}, {self.o}, {self.o})" if self.blocks else f"(m, {self.n})"
            got = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"ntk_test_train must have shape {want}, got {got}")
        k = k.to(self.device, self.dtype)
        m = k.shape[0]
        return k.permute(0, 2, 1, 3).reshape(m * self.o, self.n * self.o) if self.blocks else k

    def predict(
        self,
        decay: Tensor,
        integral: Tensor,
        f0_train: Tensor | None,
        ntk_test_train: Tensor | None,
        f0_test: Tensor | None,
        scalar: bool,
    ) -> KernelPrediction:
        """f_train = y + V decay V^T (f0 - y); f_test = f0_test - K_test V integral V^T (f0 - y)."""
        f0 = torch.zeros_like(self.y) if f0_train is None else f0_train
        f0, _ = _as_outputs("f0_train", f0.to(self.device, self.dtype), self.n)
        if f0.shape[1] != self.o:
            raise ValueError(f"f0_train must have the shape of y_train, {self.out_shape}")
        r = f0 - self.y
        train = self.y + self.apply(decay, r)
        train = train.reshape(-1, *self.out_shape)
        test = None
        if ntk_test_train is not None:
            kt = self.test_kernel(ntk_test_train)
            m = ntk_test_train.shape[0]
            if f0_test is None:
                f0t = torch.zeros(m, self.o, dtype=self.dtype, device=self.device)
            else:
                f0t, _ = _as_outputs("f0_test", f0_test.to(self.device, self.dtype), m)
                if f0t.shape[1] != self.o:
                    raise ValueError(f"f0_test must have {self.o} outputs per example")
            moved = self.apply(integral, r).reshape(
                integral.shape[0], -1, 1 if self.blocks else self.o
            )
            step = (kt @ moved).reshape(-1, m, self.o)
            test = (f0t - step).reshape(-1, m, *self.out_shape[1:])
        elif f0_test is not None:
            raise ValueError("f0_test needs ntk_test_train")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return KernelPrediction(train, test)


def _times(name: str, t: float | Tensor, *, integer: bool) -> tuple[Tensor, bool]:
    """A scalar or 1-D sequence of non-negative times (or step counts) -> (k,) float64."""
    values = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if values.ndim > 1 or values.numel() == 0:
        raise ValueError(
            f"{name} must be a number or a 1-D sequence of numbers, got shape {tuple(values.shape)}"
        )
    bad = torch.isnan(values) | (values < 0)
    if integer:
        bad = bad | torch.isinf(values) | (values != values.round())
    if bool(bad.any()):
        kind = "ints >= 0" if integer else "numbers >= 0 (inf allowed)"
        raise ValueError(f"{name} must be {kind}, got {t!r}")
    return values.reshape(-1), values.ndim == 0


def _null_threshold(eigvals: Tensor) -> float:
    return float(eigvals.abs().max()) * eigvals.shape[0] * torch.finfo(eigvals.dtype).eps


def _flow_filters(lam: Tensor, n: int, times: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient flow's functions of the eigenvalues ``lam`` at ``times`` (k,): the decay
    exp(-t lam/n) of the training residual and its integral (1 - exp(-t lam/n)) / lam (t/n at
    lam = 0), each (k, len(lam)); at t = inf the null space keeps its residual and is dropped
    from the integral (the pseudo-inverse)."""
    tt = times.to(lam.device, lam.dtype)[:, None]
    finite = torch.isfinite(tt)
    tt_f = torch.where(finite, tt, torch.zeros_like(tt))
    decay = torch.where(
        finite, torch.exp(-tt_f * lam / n), (lam <= _null_threshold(lam)).to(lam.dtype)
    )
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    integral = torch.where(lam == 0, tt_f / n, -torch.expm1(-tt_f * lam / n) / safe)
    inv = torch.where(lam > _null_threshold(lam), 1 / safe, torch.zeros_like(lam))
    integral = torch.where(finite, integral, inv.expand_as(integral))
    return decay, integral


def _descent_filters(lam: Tensor, n: int, lr: float, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient descent's functions of the eigenvalues ``lam`` after ``counts`` (k,) steps of
    rate lr: the decay (1 - lr lam/n)^k and its sum (1 - (1 - lr lam/n)^k) / lam (k lr/n at
    lam = 0), each (k, len(lam)); by log1p / expm1 where 1 - lr lam/n > 0."""
    k = counts.to(lam.device, lam.dtype)[:, None]
    a = lr * lam / n
    stable = a < 1
    log_base = torch.log1p(-torch.where(stable, a, torch.zeros_like(a)))
    decay = torch.where(stable, torch.exp(k * log_base), (1 - a) ** k)
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    integral = torch.where(stable, -torch.expm1(k * log_base), 1 - decay) / safe
    integral = torch.where(lam == 0, k * lr / n, integral)
    return decay, integral


def _filters(lam: Tensor, n: int, lr: float | None, values: Tensor) -> tuple[Tensor, Tensor]:
    """The decay and integral of gradient flow at the times ``values`` (``lr`` None), or of
    gradient descent with rate ``lr`` after ``values`` steps."""
    if lr is None:
        return _flow_filters(lam, n, values)
    return _descent_filters(lam, n, lr, values)


def _train(
    ntk_train_train: Tensor,
    y_train: Tensor,
    name: str,
    t: float | Tensor,
    lr: float | None,
    ntk_test_train: Tensor | None,
    f0_train: Tensor | None,
    f0_test: Tensor | None,
) -> KernelPrediction:
    """Gradient flow for the time ``t`` (``lr`` None) or ``t`` steps of gradient descent with
    rate ``lr``, from one eigendecomposition of the training kernel; ``name`` is the argument
    that ``t`` was given as."""
    values, scalar = _times(name, t, integer=lr is not None)
    spec = _Spectral(ntk_train_train, y_train)
    decay, integral = _filters(spec.eigvals, spec.n, lr, values)
    return spec.predict(decay, integral, f0_train, ntk_test_train, f0_test, scalar)


def kernel_gradient_flow(
    ntk_train_train: Tensor,
    y_train: Tensor,
    t: float | Tensor,
    *,
    ntk_test_train: Tensor | None = None,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> KernelPrediction:
    """Gradient flow of C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2 in function space under a fixed NTK
    (Jacot et al. 2018, section 5; Lee et al. 2019, eq. 9): df/dt = -(1/n) Theta (f - y), so

        f_t(train) = y + exp(-t Theta/n) (f0 - y)
        f_t(test)  = f0(test) - Theta(test, train) Theta^{-1} (I - exp(-t Theta/n)) (f0 - y)

    by the eigendecomposition of Theta (Theta^{-1}(I - e^{-t Theta/n}) -> t/n on its null space;
    at t = inf the null space is dropped, the pseudo-inverse of :func:`kernel_regression`).
    Gradient descent with learning rate lr for k steps is this flow at t = lr k for small lr
    (exactly: :func:`kernel_gradient_descent`). n is the number of training examples.

    Kernels: ``ntk_train_train`` (n, n) and ``ntk_test_train`` (m, n) (the same kernel on every
    output), or blocks (n, n, O, O) / (m, n, O, O) from :func:`empirical_ntk`; without a test
    kernel there are no test predictions. Outputs: (n,) or (n, O); ``f0_*=None`` means 0.
    The targets, the f0_* and the test kernel are moved to the training kernel's device and
    dtype, where the results are.
    ``t``: a number, or a 1-D sequence (then the results get a leading time dimension).
    :func:`gradient_descent_mse` makes the same predictions from one eigendecomposition for many
    calls.
    """
    return _train(ntk_train_train, y_train, "t", t, None, ntk_test_train, f0_train, f0_test)


def kernel_gradient_descent(
    ntk_train_train: Tensor,
    y_train: Tensor,
    lr: float,
    steps: int | Tensor,
    *,
    ntk_test_train: Tensor | None = None,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> KernelPrediction:
    """k steps of gradient descent with learning rate lr on C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2
    for the linearised network (fixed NTK): f_{k+1} = f_k - (lr/n) Theta (f_k - y), so

        f_k(train) = y + (I - lr Theta/n)^k (f0 - y)
        f_k(test)  = f0(test) - Theta(test, train) Theta^{-1} (I - (I - lr Theta/n)^k) (f0 - y)

    the discrete-time version of :func:`kernel_gradient_flow` (which it approaches at t = lr k
    when lr lambda_max / n << 1; it diverges when lr lambda_max / n > 2). This is exactly what
    GD on :func:`linearize`'s model produces. Arguments as in :func:`kernel_gradient_flow`;
    ``steps`` an int >= 0 or a 1-D sequence of them.
    """
    lr = check_positive("lr", lr)
    return _train(ntk_train_train, y_train, "steps", steps, lr, ntk_test_train, f0_train, f0_test)


def gradient_descent_mse(
    k_train_train: Tensor, y_train: Tensor, lr: float | None = None
) -> Callable[..., KernelPrediction]:
    """Least-squares training under a fixed kernel as a predictor function, in the shape of
    neural-tangents' ``predict.gradient_descent_mse``: the training kernel is diagonalised once,
    here, and ``predict(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None)`` then costs
    a few matrix products per call.

    ``lr=None``: gradient flow, ``t`` a time (:func:`kernel_gradient_flow`). ``lr`` a number:
    gradient descent with that learning rate, ``t`` a number of steps (exactly
    :func:`kernel_gradient_descent`; neural-tangents instead keeps continuous time and lets its
    learning rate scale it). ``t=None`` is the end of training, t -> inf, the same for both as
    long as descent converges (lr lambda_max / n < 2; a larger lr raises). ``t`` may also be a
    1-D sequence (a leading time dimension in the results).

    The loss and the shapes are those of :func:`kernel_gradient_flow`: C = 1/n sum_i 1/2
    ||f(x_i) - y_i||^2, kernels (n, n) / (m, n) or blocks (n, n, O, O) / (m, n, O, O), outputs
    (n,) or (n, O). ``fx_train_0`` is f0 on the training inputs, a tensor or a number for every
    entry (0: the centred network); ``fx_test_0`` f0 on the test inputs (None: 0), with
    ``k_test_train`` Theta(test, train). Returns a :class:`KernelPrediction` (``train``, and
    ``test`` when ``k_test_train`` is given) where neural-tangents returns the arrays.
    """
    if lr is not None:
        lr = check_positive("lr", lr)
    spec = _Spectral(k_train_train, y_train)
    lam = spec.eigvals

    def predict(
        t: float | Tensor | None = None,
        fx_train_0: float | Tensor = 0.0,
        fx_test_0: float | Tensor | None = None,
        k_test_train: Tensor | None = None,
    ) -> KernelPrediction:
        if t is None:
            if lr is not None and bool((lr * lam / spec.n >= 2).any()):
                raise ValueError(
                    f"gradient descent with lr={lr} diverges on this kernel (lr lambda_max / n = "
                    f"{lr * float(lam.max()) / spec.n:.3g} >= 2): it has no t -> inf limit"
                )
            decay, integral = _flow_filters(lam, spec.n, torch.tensor([math.inf]))
            scalar = True
        else:
            values, scalar = _times("t", t, integer=lr is not None)
            decay, integral = _filters(lam, spec.n, lr, values)
        f0_train = _filled("fx_train_0", fx_train_0, spec.out_shape, spec)
        f0_test = fx_test_0
        if not isinstance(fx_test_0, Tensor) and fx_test_0 is not None:
            if k_test_train is None:
                raise ValueError("fx_test_0 needs k_test_train")
            m = k_test_train.shape[0]
            f0_test = _filled("fx_test_0", fx_test_0, (m, *spec.out_shape[1:]), spec)
        return spec.predict(decay, integral, f0_train, k_test_train, f0_test, scalar)

    return predict


def _filled(name: str, value: float | Tensor, shape: tuple[int, ...], spec: _Spectral) -> Tensor:
    """``value`` itself if a tensor, else a tensor of ``shape`` filled with that number."""
    if isinstance(value, Tensor):
        return value
    value = check_number(name, value)
    return torch.full(shape, value, dtype=spec.dtype, device=spec.device)


def kernel_regression(
    ntk_train_train: Tensor,
    ntk_test_train: Tensor,
    y_train: Tensor,
    *,
    ridge: float = 0.0,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> Tensor:
    """The t -> infinity limit of :func:`kernel_gradient_flow` on the test inputs:

        f_inf(test) = f0(test) + Theta(test, train) (Theta + ridge I)^{-1} (y - f0(train))

    (Jacot et al. 2018, section 5: the limit of least-squares training is kernel regression
    with the NTK). With ridge = 0 the inverse is the pseudo-inverse (eigenvalues below
    n·eps·lambda_max count as 0). ``f0_*=None`` means 0. Returns (m, ...) like y_train per example.
    """
    ridge = check_nonnegative("ridge", ridge)
    if ntk_test_train is None:
        raise ValueError("ntk_test_train must be a tensor of shape (m, n) or (m, n, O, O)")
    spec = _Spectral(ntk_train_train, y_train)
    lam = spec.eigvals + ridge
    keep = lam > (_null_threshold(spec.eigvals) if ridge == 0 else 0.0)
    inv = torch.where(keep, 1 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    decay = torch.zeros_like(lam)[None, :]
    return spec.predict(decay, inv[None, :], f0_train, ntk_test_train, f0_test, True).test
