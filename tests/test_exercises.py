"""gradcourse.exercises: every message the checker can give is reachable, every exercise accepts a
right solution written the way a student would (independently of the library), and at least two
plausible wrong solutions per exercise are caught with the right diagnosis."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

import gradcourse as gc
from gradcourse.exercises import EXERCISES, STATUSES, Case, Exercise, check, compare, pick

# --- right solutions, written as a student would (no gradcourse inside) -----------------------


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def grad_norms(model, x, y):
    params = _params(model)

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))


def hvp(model, x, y, v):
    params = _params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    chunks = torch.split(v, [p.numel() for p in params.values()])
    tangent = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    _, out = jvp(grad(loss), (params,), (tangent,))
    return torch.cat([out[n].reshape(-1) for n in names])


def hutchinson(matvec, probes):
    terms = torch.stack([v @ matvec(v) for v in probes])
    return terms.mean(), terms.std() / math.sqrt(len(terms))


def ritz_values(matvec, v0, k):
    q = [v0 / v0.norm()]
    alpha, beta = [], []
    for j in range(k):
        w = matvec(q[j])
        alpha.append(w @ q[j])
        basis = torch.stack(q, dim=1)
        w = w - basis @ (basis.T @ w)
        w = w - basis @ (basis.T @ w)
        if j < k - 1:
            beta.append(w.norm())
            q.append(w / beta[-1])
    t = torch.diag(torch.stack(alpha))
    if k > 1:
        b = torch.stack(beta)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigvalsh(t)


def power_iteration(matvec, v0, iters):
    v = v0 / v0.norm()
    for _ in range(iters):
        w = matvec(v)
        v = w / w.norm()
    return float(v @ matvec(v))


def second_moment_map(hessians, lr, batch_size, s):
    eye = torch.eye(hessians.shape[1], dtype=hessians.dtype)
    batches = list(itertools.combinations(range(len(hessians)), batch_size))
    total = torch.zeros_like(s)
    for b in batches:
        step = eye - lr * hessians[list(b)].mean(0)
        total = total + step @ s @ step
    return total / len(batches)


def empirical_ntk(model, x1, x2):
    params = _params(model)

    def f(p, x):
        return functional_call(model, p, (x[None],)).squeeze()

    j1 = vmap(jacrev(f), in_dims=(None, 0))(params, x1)
    j2 = vmap(jacrev(f), in_dims=(None, 0))(params, x2)
    return sum(j1[k].flatten(1) @ j2[k].flatten(1).T for k in params)


def kernel_flow(kernel, y, f0, t):
    n = len(y)
    return y + torch.linalg.matrix_exp(-t * kernel / n) @ (f0 - y)


def el2n(model, x, y):
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    return (p - F.one_hot(y, p.shape[1]).to(p)).norm(dim=1)


def forgetting(correct):
    c = torch.as_tensor(correct).bool()
    events = (c[:-1] & ~c[1:]).sum(0).double()
    events[~c.any(0)] = c.shape[0]
    return events


def clip(g, c):
    norms = g.norm(dim=1, keepdim=True)
    return g * torch.clamp(c / norms.clamp_min(1e-300), max=1.0)


def _per_example_flat(model, x, y):
    params = _params(model)

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.flatten(1) for v in g.values()], dim=1)


def dp_sgd_direction(model, x, y, c, sigma, z):
    g = _per_example_flat(model, x, y)
    return (clip(g, c).sum(0) + sigma * c * z) / len(x)


def pgd_linf(model, x, y, eps, step_size, steps):
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * g.sign()).clamp(-eps, eps)
    return delta


def grad_cam(model, x, layer, target):
    saved = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, out: saved.update(a=out)
    )
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = saved["a"]
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * a).sum(1)).detach()


def subspace_forward(model, theta0, P, theta_d, x):  # noqa: N803
    theta = theta0 + P @ theta_d
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()], strict=True)
    chunks = torch.split(theta, [math.prod(s) for s in shapes])
    params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
    return functional_call(model, params, (x,))


def d_int(ds, acc, threshold):
    for k, a in enumerate(acc):
        if a >= threshold:
            if k == 0:
                return float(ds[0])
            frac = (threshold - acc[k - 1]) / (a - acc[k - 1])
            return math.exp(math.log(ds[k - 1]) + frac * math.log(ds[k] / ds[k - 1]))
    return math.inf


def project_radial(w, update):
    unit = w / w.norm(dim=1, keepdim=True)
    return update - unit * (unit * update).sum(dim=1, keepdim=True)


def norm_prediction(norm0_sq, update_norms_sq, lr, beta):
    out, carry = [float(norm0_sq)], 0.0
    for p in update_norms_sq:
        out.append(out[-1] + lr**2 * p + 2 * lr**2 * carry)
        carry = beta * (carry + p)
    return torch.tensor(out, dtype=torch.float64)


def coherence_ratio(grads):
    g = grads.reshape(len(grads), -1)
    return float(g.sum(0).pow(2).sum() / g.pow(2).sum())


def median_of_means(g, k):
    means = torch.stack([part.mean(0) for part in torch.tensor_split(g, k)])
    return (
        means.median(0).values if k % 2 else means.sort(0).values[k // 2 - 1 : k // 2 + 1].mean(0)
    )


def log_bisection(stable, low, high, iters):
    if stable(high):
        return high
    lo, hi = math.log(low), math.log(high)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if stable(math.exp(mid)):
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def noise_std(eta, gamma, t):
    return math.sqrt(eta / (1 + t) ** gamma)


def dgc_compress(g, u, v, momentum, k, key=torch.abs):
    """``key``: what the top k are ranked by (|v|; a mutant: v itself)."""
    u = momentum * u + g
    v = v + u
    idx = key(v).flatten().argsort(descending=True)[:k]
    sent = torch.zeros_like(v).flatten()
    sent[idx] = v.flatten()[idx]
    keep = torch.ones_like(sent)
    keep[idx] = 0
    return sent.view_as(v), u * keep.view_as(u), v * keep.view_as(v)


def quantise_byte(x):
    code = torch.round(16 * torch.log(x.abs().double().clamp_min(1e-300))) + 64
    code = code.clamp(0, 127).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 7)


def clip_top(g, fraction):
    tau = g.abs().sort(descending=True).values[int(len(g) * fraction)]
    return g.clamp(-tau, tau)


def adam_moments(grads, beta1, beta2, second=lambda g, m: g * g):
    """Adam's moments after grads; ``second`` gives what v averages (g^2; a mutant: m^2)."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * second(g, m)
    return m, v


def adam_direction(grads, beta1, beta2, eps):
    m, v = adam_moments(grads, beta1, beta2)
    t = len(grads)
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)


SOLUTIONS = {
    "00.per_example_grad_norms": grad_norms,
    "00.hvp": hvp,
    "01.hutchinson": hutchinson,
    "01.ritz_values": ritz_values,
    "02.power_iteration": power_iteration,
    "02.second_moment_map": second_moment_map,
    "03.empirical_ntk": empirical_ntk,
    "03.kernel_flow": kernel_flow,
    "04.el2n": el2n,
    "04.forgetting_events": forgetting,
    "05.clip": clip,
    "05.dp_sgd_direction": dp_sgd_direction,
    "06.pgd_linf": pgd_linf,
    "06.grad_cam": grad_cam,
    "07.subspace_forward": subspace_forward,
    "07.d_int": d_int,
    "08.project_radial": project_radial,
    "08.norm_prediction": norm_prediction,
    "09.clip_top": clip_top,
    "09.adam_direction": adam_direction,
    "10.coherence_ratio": coherence_ratio,
    "10.median_of_means": median_of_means,
    "11.log_bisection": log_bisection,
    "11.noise_std": noise_std,
    "12.dgc_compress": dgc_compress,
    "12.quantise_byte": quantise_byte,
}


def test_every_exercise_has_a_solution_here_and_at_least_two_per_notebook():
    assert set(SOLUTIONS) == set(EXERCISES)
    per_notebook = {}
    for name in EXERCISES:
        per_notebook[name[:2]] = per_notebook.get(name[:2], 0) + 1
    assert sorted(per_notebook) == [
        "00",
        "01",
        "02",
        "03",
        "04",
        "05",
        "06",
        "07",
        "08",
        "09",
        "10",
        "11",
        "12",
    ]
    assert min(per_notebook.values()) >= 2


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_a_right_solution_passes(name):
    fb = check(name, SOLUTIONS[name])
    assert fb.passed, str(fb)
    assert fb.cases_passed == fb.cases_total >= 2
    assert str(fb).startswith("✓") and "rtol=" in str(fb)


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_a_stub_is_not_attempted_and_does_not_raise(name):
    def stub(*args, **kwargs):
        raise NotImplementedError

    fb = check(name, stub)
    assert fb.status == "not attempted" and not fb
    assert str(fb).startswith("…")


# --- mutations: plausible wrong solutions, each caught with the right diagnosis ----------------


def _mutants():
    def norms_of_batch_grad(model, x, y):  # the batch's gradient, not each example's
        params = _params(model)
        g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
        total = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        return total.expand(len(x))

    def summed_loss_grad_norms(model, x, y):  # per-example grads of the loss summed, times n
        return len(x) * grad_norms(model, x, y)

    def squared_norms(model, x, y):
        return grad_norms(model, x, y) ** 2

    def hvp_of_summed_loss(model, x, y, v):
        return len(x) * hvp(model, x, y, v)

    def hvp_sign(model, x, y, v):
        return -hvp(model, x, y, v)

    def hutchinson_sum(matvec, probes):
        est, se = hutchinson(matvec, probes)
        return est * len(probes), se

    def hutchinson_std_not_stderr(matvec, probes):
        terms = torch.stack([v @ matvec(v) for v in probes])
        return terms.mean(), terms.std()

    def ritz_unnormalised(matvec, v0, k):  # forgot to normalise v0 (shows at k = 1)
        if k == 1:
            return (v0 @ matvec(v0)).reshape(1)
        return ritz_values(matvec, v0, k)

    def ritz_diagonal(matvec, v0, k):  # the alphas, not the eigenvalues of T
        q = [v0 / v0.norm()]
        alpha = []
        for j in range(k):
            w = matvec(q[j])
            alpha.append(w @ q[j])
            basis = torch.stack(q, dim=1)
            w = w - basis @ (basis.T @ w)
            q.append(w / w.norm())
        return torch.sort(torch.stack(alpha)).values

    def power_abs(matvec, v0, iters):  # the norm of A v: |lambda|, sign lost
        return abs(power_iteration(matvec, v0, iters))

    def power_squared(matvec, v0, iters):  # ||A v||^2
        return power_iteration(matvec, v0, iters) ** 2

    def moment_with_replacement(hessians, lr, batch_size, s):
        eye = torch.eye(hessians.shape[1], dtype=hessians.dtype)
        total = torch.zeros_like(s)
        batches = list(itertools.product(range(len(hessians)), repeat=batch_size))
        for b in batches:
            step = eye - lr * hessians[list(b)].mean(0)
            total = total + step @ s @ step
        return total / len(batches)

    def moment_without_noise(hessians, lr, batch_size, s):  # gradient descent's map
        step = torch.eye(hessians.shape[1], dtype=hessians.dtype) - lr * hessians.mean(0)
        return step @ s @ step

    def ntk_transposed(model, x1, x2):
        return empirical_ntk(model, x2, x1)

    def ntk_last_layer_only(model, x1, x2):
        params = _params(model)
        last = list(params)[-2:]

        def f(p, x):
            return functional_call(model, {**params, **p}, (x[None],)).squeeze()

        sub = {k: params[k] for k in last}
        j1 = vmap(jacrev(f), in_dims=(None, 0))(sub, x1)
        j2 = vmap(jacrev(f), in_dims=(None, 0))(sub, x2)
        return sum(j1[k].flatten(1) @ j2[k].flatten(1).T for k in sub)

    def flow_without_n(kernel, y, f0, t):
        return y + torch.linalg.matrix_exp(-t * kernel) @ (f0 - y)

    def flow_elementwise_exp(kernel, y, f0, t):
        return y + torch.exp(-t * kernel / len(y)) @ (f0 - y)

    def el2n_logits(model, x, y):
        with torch.no_grad():
            out = model(x)
        return (out - F.one_hot(y, out.shape[1]).to(out)).norm(dim=1)

    def el2n_squared(model, x, y):
        return el2n(model, x, y) ** 2

    def forgetting_counts_learning(correct):
        c = torch.as_tensor(correct).bool()
        events = (c[:-1] != c[1:]).sum(0).double()
        events[~c.any(0)] = c.shape[0]
        return events

    def forgetting_never_zero(correct):
        c = torch.as_tensor(correct).bool()
        return (c[:-1] & ~c[1:]).sum(0).double()

    def clip_normalise_all(g, c):
        return c * g / g.norm(dim=1, keepdim=True)

    def clip_elementwise(g, c):
        return g.clamp(-c, c)

    def dp_no_division(model, x, y, c, sigma, z):
        return dp_sgd_direction(model, x, y, c, sigma, z) * len(x)

    def dp_clip_the_mean(model, x, y, c, sigma, z):
        g = _per_example_flat(model, x, y).mean(0, keepdim=True)
        return clip(g, c)[0] + sigma * c * z / len(x)

    def subspace_own_params(model, theta0, P, theta_d, x):  # noqa: N803
        # the network's own parameters as theta0, not the theta0 given
        own = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return subspace_forward(model, own, P, theta_d, x)

    def subspace_transposed_reshape(model, theta0, P, theta_d, x):  # noqa: N803
        # each weight matrix filled column-first: W.T's layout read into W
        theta = theta0 + P @ theta_d
        params, start = {}, 0
        for n, p in model.named_parameters():
            chunk = theta[start : start + p.numel()]
            start += p.numel()
            params[n] = chunk.view(p.shape[::-1]).transpose(0, -1) if p.dim() > 1 else chunk
        return functional_call(model, params, (x,))

    def d_int_linear_in_d(ds, acc, threshold):
        for k, a in enumerate(acc):
            if a >= threshold:
                if k == 0:
                    return float(ds[0])
                frac = (threshold - acc[k - 1]) / (a - acc[k - 1])
                return ds[k - 1] + frac * (ds[k] - ds[k - 1])
        return math.inf

    def project_whole_tensor(w, update):  # one radial direction for the whole tensor
        unit = w / w.norm()
        return update - unit * (unit * update).sum()

    def project_unnormalised(w, update):  # w_row, not w_row / ||w_row||
        return update - w * (w * update).sum(dim=1, keepdim=True)

    def bisection_in_lr_not_log(stable, low, high, iters):  # the midpoint of lr, not of log lr
        if stable(high):
            return high
        lo, hi = low, high
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if stable(mid) else (lo, mid)
        return lo

    def bisection_returns_the_unstable_end(stable, low, high, iters):
        if stable(high):
            return high
        lo, hi = math.log(low), math.log(high)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if stable(math.exp(mid)) else (lo, mid)
        return math.exp(hi)

    def clip_top_next_index(g, fraction):  # the (floor(rho d) + 2)-th largest: one too many
        tau = g.abs().sort(descending=True).values[min(int(len(g) * fraction) + 1, len(g) - 1)]
        return g.clamp(-tau, tau)

    def clip_top_signed_threshold(g, fraction):  # the largest g_i, not the largest |g_i|
        tau = g.sort(descending=True).values[int(len(g) * fraction)].abs()
        return g.clamp(-tau, tau)

    def clip_top_to_zero(g, fraction):  # drops the top coordinates instead of clipping them
        tau = g.abs().sort(descending=True).values[int(len(g) * fraction)]
        return torch.where(g.abs() > tau, torch.zeros_like(g), g)

    def adam_without_bias_correction(grads, beta1, beta2, eps):
        m, v = adam_moments(grads, beta1, beta2)
        return m / (v.sqrt() + eps)

    def adam_eps_inside_sqrt(grads, beta1, beta2, eps):
        m, v = adam_moments(grads, beta1, beta2)
        t = len(grads)
        return (m / (1 - beta1**t)) / (v / (1 - beta2**t) + eps).sqrt()

    def adam_square_of_mean(grads, beta1, beta2, eps):  # v from m^2, not from g^2
        m, v = adam_moments(grads, beta1, beta2, second=lambda g, m: m * m)
        t = len(grads)
        return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)

    def noise_variance_not_std(eta, gamma, t):  # the ports' pitfall
        return eta / (1 + t) ** gamma

    def noise_gamma_on_t_not_1_plus_t(eta, gamma, t):
        return math.sqrt(eta / max(t, 1) ** gamma)

    def coherence_alpha_not_ratio(grads):  # alpha, the ratio divided by m
        return coherence_ratio(grads) / len(grads)

    def coherence_sum_of_norms(grads):  # (sum ||g_i||)^2 in the denominator
        g = grads.reshape(len(grads), -1)
        return float(g.sum(0).pow(2).sum() / g.norm(dim=1).sum() ** 2)

    def median_lower_middle(g, k):  # torch.median's lower middle for an even k
        return torch.stack([p.mean(0) for p in torch.tensor_split(g, k)]).median(0).values

    def median_of_examples(g, k):  # the median of the examples, no group means
        return g.median(0).values

    def norm_without_momentum_term(norm0_sq, update_norms_sq, lr, beta):
        return norm_prediction(norm0_sq, update_norms_sq, lr, 0.0)

    def norm_momentum_term_once(norm0_sq, update_norms_sq, lr, beta):  # the 2 forgotten
        out, carry = [float(norm0_sq)], 0.0
        for p in update_norms_sq:
            out.append(out[-1] + lr**2 * p + lr**2 * carry)
            carry = beta * (carry + p)
        return torch.tensor(out, dtype=torch.float64)

    def d_int_last_grid_point_when_never(ds, acc, threshold):
        d = d_int(ds, acc, threshold)
        return float(ds[-1]) if d == math.inf else d

    def d_int_last_below(ds, acc, threshold):  # the last crossing, not the first
        below = [k for k, a in enumerate(acc) if a < threshold]
        if not below:
            return float(ds[0])
        k = below[-1] + 1
        if k == len(acc):
            return math.inf
        frac = (threshold - acc[k - 1]) / (acc[k] - acc[k - 1])
        return math.exp(math.log(ds[k - 1]) + frac * math.log(ds[k] / ds[k - 1]))

    def pgd_descent(model, x, y, eps, step_size, steps):
        return pgd_linf(model, x, -y * 0 + y, eps, -step_size, steps).clamp(-eps, eps)

    def pgd_no_projection(model, x, y, eps, step_size, steps):
        delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
            delta = delta.detach() + step_size * g.sign()
        return delta

    def cam_without_relu(model, x, layer, target):
        saved = {}
        h = dict(model.named_modules())[layer].register_forward_hook(
            lambda m, i, out: saved.update(a=out)
        )
        logits = model(x)
        h.remove()
        (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), saved["a"])
        return (g.mean(dim=(2, 3), keepdim=True) * saved["a"]).sum(1).detach()

    def cam_sum_over_positions(model, x, layer, target):
        return 64 * grad_cam(model, x, layer, target)

    def dgc_without_masking(g, u, v, momentum, k):
        sent, _, v2 = dgc_compress(g, u, v, momentum, k)
        return sent, momentum * u + g, v2

    def dgc_accumulates_gradient_not_momentum(g, u, v, momentum, k):
        sent, _, v2 = dgc_compress(g, torch.zeros_like(u), v, 0.0, k)
        u2 = momentum * u + g
        return sent, u2 * (sent == 0), v2

    def dgc_signed_top_k(g, u, v, momentum, k):
        return dgc_compress(g, u, v, momentum, k, key=lambda t: t)

    def byte_without_sign(x):
        return quantise_byte(x) & 0x7F

    def byte_floor_not_round(x):
        code = torch.floor(16 * torch.log(x.abs().double().clamp_min(1e-300))) + 64
        return code.clamp(0, 127).to(torch.uint8) | ((x < 0).to(torch.uint8) << 7)

    def byte_without_clamp(x):
        code = (torch.round(16 * torch.log(x.abs().double().clamp_min(1e-300))) + 64).long()
        return (code % 128).to(torch.uint8) | ((x < 0).to(torch.uint8) << 7)

    return [
        ("00.per_example_grad_norms", norms_of_batch_grad, "wrong", None),
        ("00.per_example_grad_norms", summed_loss_grad_norms, "wrong factor", "n, the number"),
        ("00.per_example_grad_norms", squared_norms, "wrong", None),
        ("00.hvp", hvp_of_summed_loss, "wrong factor", "n, the number of examples"),
        ("00.hvp", hvp_sign, "wrong sign", None),
        ("01.hutchinson", hutchinson_sum, "wrong factor", "m, the number of probes"),
        ("01.hutchinson", hutchinson_std_not_stderr, "wrong factor", "sqrt(m)"),
        ("01.ritz_values", ritz_diagonal, "wrong", None),
        ("01.ritz_values", ritz_unnormalised, "wrong factor", "||v0||^2"),
        ("02.power_iteration", power_abs, "wrong sign", None),
        ("02.power_iteration", power_squared, "wrong", None),
        ("02.second_moment_map", moment_with_replacement, "wrong", None),
        ("02.second_moment_map", moment_without_noise, "wrong", None),
        ("03.empirical_ntk", ntk_transposed, "wrong shape", "transposed?"),
        ("03.empirical_ntk", ntk_last_layer_only, "wrong", None),
        ("03.kernel_flow", flow_without_n, "wrong", None),
        ("03.kernel_flow", flow_elementwise_exp, "wrong", None),
        ("04.el2n", el2n_logits, "wrong", None),
        ("04.el2n", el2n_squared, "wrong", None),
        ("04.forgetting_events", forgetting_counts_learning, "wrong", None),
        ("04.forgetting_events", forgetting_never_zero, "wrong", None),
        ("05.clip", clip_normalise_all, "not finite", None),
        ("05.clip", clip_elementwise, "wrong", None),
        ("05.dp_sgd_direction", dp_no_division, "wrong factor", "the batch size b"),
        ("05.dp_sgd_direction", dp_clip_the_mean, "wrong", None),
        ("06.pgd_linf", pgd_descent, "wrong sign", None),
        ("06.pgd_linf", pgd_no_projection, "wrong", None),
        ("06.grad_cam", cam_without_relu, "wrong", None),
        ("06.grad_cam", cam_sum_over_positions, "wrong factor", "h w, the positions"),
        ("07.subspace_forward", subspace_own_params, "wrong", None),
        ("07.subspace_forward", subspace_transposed_reshape, "wrong", None),
        ("07.d_int", d_int_linear_in_d, "wrong", None),
        ("07.d_int", d_int_last_below, "wrong", None),
        ("07.d_int", d_int_last_grid_point_when_never, "wrong", None),
        ("08.project_radial", project_whole_tensor, "wrong", None),
        ("08.project_radial", project_unnormalised, "wrong", None),
        ("08.norm_prediction", norm_without_momentum_term, "wrong", None),
        ("08.norm_prediction", norm_momentum_term_once, "wrong", None),
        ("09.clip_top", clip_top_next_index, "wrong", None),
        ("09.clip_top", clip_top_signed_threshold, "wrong", None),
        ("09.clip_top", clip_top_to_zero, "wrong", None),
        ("09.adam_direction", adam_without_bias_correction, "wrong", None),
        ("09.adam_direction", adam_eps_inside_sqrt, "wrong", None),
        ("09.adam_direction", adam_square_of_mean, "wrong", None),
        ("10.coherence_ratio", coherence_alpha_not_ratio, "wrong", None),
        ("10.coherence_ratio", coherence_sum_of_norms, "wrong", None),
        ("10.median_of_means", median_lower_middle, "wrong", None),
        ("10.median_of_means", median_of_examples, "wrong", None),
        ("11.log_bisection", bisection_in_lr_not_log, "wrong", None),
        ("11.log_bisection", bisection_returns_the_unstable_end, "wrong", None),
        ("11.noise_std", noise_variance_not_std, "wrong", None),
        ("11.noise_std", noise_gamma_on_t_not_1_plus_t, "wrong", None),
        ("12.dgc_compress", dgc_without_masking, "wrong", None),
        ("12.dgc_compress", dgc_accumulates_gradient_not_momentum, "wrong", None),
        ("12.dgc_compress", dgc_signed_top_k, "wrong", None),
        ("12.quantise_byte", byte_without_sign, "wrong", None),
        ("12.quantise_byte", byte_floor_not_round, "wrong", None),
        ("12.quantise_byte", byte_without_clamp, "wrong", None),
    ]


MUTANTS = _mutants()


@pytest.mark.parametrize(
    ("name", "wrong", "status", "says"), MUTANTS, ids=[m[1].__name__ for m in MUTANTS]
)
def test_a_plausible_wrong_solution_is_caught_with_the_right_diagnosis(name, wrong, status, says):
    fb = check(name, wrong)
    assert not fb.passed
    assert fb.status == status, str(fb)
    if says is not None:
        assert says in fb.message, str(fb)
    assert fb.case is not None and fb.case in str(fb)


def test_every_exercise_has_at_least_two_caught_mutants():
    counts = {}
    for name, *_ in MUTANTS:
        counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(EXERCISES)
    assert min(counts.values()) >= 2


# --- every message of the checker is reachable -------------------------------------------------


def _toy(fn, want=lambda x: 2.0 * x, cases=None):
    """An exercise whose reference doubles its input, for reaching each message."""
    name = "toy"
    EXERCISES[name] = Exercise(
        name,
        "toy(x)",
        "twice x",
        "2 x",
        want,
        cases
        or (
            lambda: [
                Case("a 2 x 3 matrix", (torch.arange(1.0, 7.0).reshape(2, 3),), factors={"k": 3})
            ]
        ),
    )
    try:
        return check(name, fn)
    finally:
        del EXERCISES[name]


def test_right_states_its_tolerance_and_cases():
    fb = _toy(lambda x: 2 * x + 1e-12)
    assert fb.passed and "a 2 x 3 matrix" in fb.message and "rtol=1e-06" in fb.message


def test_close_but_beyond_the_tolerance_is_wrong_with_where_and_how_much():
    def off(x):
        out = 2 * x
        out[1, 2] += 1e-3
        return out

    fb = _toy(off)
    assert fb.status == "wrong"
    assert "index [1, 2]" in fb.message and "expected 12" in fb.message
    assert "tolerance rtol=1e-06" in fb.message


@pytest.mark.parametrize(
    ("fn", "status", "says"),
    [
        (lambda x: None, "wrong type", "forget `return`"),
        (lambda x: "twelve", "wrong type", "str"),
        (lambda x: (2 * x).T, "wrong shape", "transposed?"),
        (lambda x: (2 * x)[None], "wrong shape", "size 1"),
        (lambda x: (2 * x).sum(), "wrong shape", "reduce"),
        (lambda x: (2 * x).expand(4, 2, 3), "wrong shape", "extra leading dimension"),
        (lambda x: 2 * x / 0.0, "not finite", "NaN or inf"),
        (lambda x: -2 * x, "wrong sign", "minus the expected"),
        (lambda x: 4 * x, "wrong factor", "(= 2)"),
        (lambda x: x, "wrong factor", "(= 1/2)"),
        (lambda x: 6 * x, "wrong factor", "(= k)"),
        (lambda x: -6 * x, "wrong sign", "minus k"),
        (lambda x: 2.5 * x, "wrong factor", "1.25 times"),
        (
            lambda x: 2 * x * torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]),
            "wrong sign",
            "1 of 6",
        ),
    ],
)
def test_each_diagnosis_is_reachable(fn, status, says):
    fb = _toy(fn)
    assert fb.status == status, str(fb)
    assert says in fb.message, str(fb)


def test_an_exception_names_its_type_and_the_line_of_the_students_function():
    def broken(x):
        y = 2 * x
        return y @ y  # (2, 3) @ (2, 3)

    fb = _toy(broken)
    assert fb.status == "raised" and "RuntimeError" in fb.message
    assert "line 3 of your function" in fb.message and "y @ y" in fb.message


def test_an_exception_inside_a_called_function_names_both():
    def broken(x):
        return torch.linalg.cholesky(-torch.eye(2)) * x

    fb = _toy(broken)
    assert fb.status == "raised" and "line 2 of your function" in fb.message


def test_an_input_changed_in_place_is_reported_and_the_reference_sees_the_original():
    seen = []

    def want(x):
        seen.append(x.clone())
        return 2 * x

    def in_place(x):
        return x.mul_(2)

    fb = _toy(in_place, want=want)
    assert fb.status == "changed its input"
    assert not seen  # stopped before the reference: nothing compared against a changed input


def test_tuples_and_dicts_are_compared_entry_by_entry():
    x = torch.ones(3)
    assert compare(x, x)[0] == "right"
    fb = _toy(lambda x: (2 * x, x), want=lambda x: (2 * x, x.sum()))
    assert fb.status == "wrong shape" and "output 1" in fb.message
    fb = _toy(lambda x: 2 * x, want=lambda x: (2 * x, x))
    assert fb.status == "wrong type" and "tuple of 2" in fb.message
    fb = _toy(lambda x: {"a": 2 * x}, want=lambda x: {"a": 2 * x, "b": x})
    assert fb.status == "wrong type" and "keys" in fb.message
    fb = _toy(lambda x: {"a": 2 * x, "b": -x}, want=lambda x: {"a": 2 * x, "b": x})
    assert fb.status == "wrong sign" and "['b']" in fb.message


def test_numbers_where_the_reference_is_a_number_tensors_where_it_is_a_tensor():
    import numpy as np

    assert compare(3, 3.0)[0] == "right"
    assert compare(torch.tensor(2.0), 2.0)[0] == "right"
    assert compare(np.float64(2.0), 2.0)[0] == "right"
    # the cells after a check call tensor methods on the student's result
    status, message = compare(np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert status == "wrong type" and "torch tensor" in message and "torch.as_tensor" in message
    assert compare([1.0, 2.0], torch.tensor([1.0, 2.0]))[0] == "wrong type"


def test_python_numbers_are_compared_in_float64():
    x = 1.0 + 1e-9  # not a float32 number
    assert compare(torch.tensor(x, dtype=torch.float64), x, rtol=1e-13, atol=0)[0] == "right"
    assert compare(x, 1.0, rtol=1e-13, atol=0)[0] == "wrong"


def test_close_but_beyond_the_tolerance_names_the_worst_entry_and_float32():
    want = torch.tensor([1000.0, 1e-3, 5.0], dtype=torch.float64)
    got = want.clone()
    got[0] += 1e-4  # the largest absolute error, within rtol * 1000
    got[1] += 1e-6  # a smaller error that breaks the tolerance
    status, message = compare(got, want, rtol=1e-6, atol=1e-9)
    assert status == "wrong" and "at index [1]" in message and "close, but beyond" in message
    status, message = compare(want.float(), want + 1e-3 * want, rtol=1e-6, atol=1e-9)
    assert status == "wrong" and "times" not in message  # a factor near 1 is not a factor
    assert "torch.float32" in message and "dtype=" in message


def test_never_raises_unknown_exercise_not_a_function_or_a_checker_bug():
    assert check("99.nothing", lambda: 0).status == "unknown exercise"
    assert check("05.clip", 3).status == "wrong type"
    fb = _toy(lambda x: 2 * x, cases=lambda: 1 / 0)
    assert fb.status == "checker error" and "gradcourse bug" in fb.message


def test_every_status_is_reachable():
    def stub(x):
        raise NotImplementedError

    def in_place(x):
        return x.mul_(2)

    reached = {
        _toy(lambda x: 2 * x).status,  # right
        _toy(stub).status,  # not attempted
        _toy(lambda x: None).status,  # wrong type
        _toy(lambda x: (2 * x).T).status,  # wrong shape
        _toy(lambda x: 2 * x / 0.0).status,  # not finite
        _toy(lambda x: 4 * x).status,  # wrong factor
        _toy(lambda x: -2 * x).status,  # wrong sign
        _toy(lambda x: 2 * x + 1).status,  # wrong
        _toy(lambda x: x @ x).status,  # raised
        _toy(in_place).status,  # changed its input
        check("99.none", stub).status,  # unknown exercise
        _toy(lambda x: 2 * x, cases=lambda: 1 / 0).status,  # checker error
    }
    assert reached == set(STATUSES)


def test_pick_uses_the_students_function_only_once_it_passes(capsys):
    mine, library = object(), object()
    assert pick(check("05.clip", clip), mine, library) is mine
    assert "your function" in capsys.readouterr().out
    assert pick(check("05.clip", lambda g, c: g), mine, library, quiet=True) is library


def test_describe_lists_every_exercise():
    text = gc.exercises.describe()
    for name, e in EXERCISES.items():
        assert name in text and e.against in text


def test_reference_is_the_checkers_reference_and_names_a_wrong_exercise():
    assert gc.exercises.reference("05.clip") is EXERCISES["05.clip"].reference
    with pytest.raises(ValueError, match="no exercise '99.x'"):
        gc.exercises.reference("99.x")


def test_more_plausible_mistakes_from_a_student_review_are_caught_with_their_diagnosis():
    def mean_loss_norms(model, x, y):  # the gradient of the mean over the batch: 1/n
        return grad_norms(model, x, y) / len(x)

    fb = check("00.per_example_grad_norms", mean_loss_norms)
    assert fb.status == "wrong factor" and "1/n" in fb.message

    def population_std(matvec, probes):
        terms = torch.stack([v @ matvec(v) for v in probes])
        return terms.mean(), terms.std(correction=0) / math.sqrt(len(terms))

    fb = check("01.hutchinson", population_std)
    assert fb.status == "wrong factor" and "ddof=0" in fb.message and "output 1" in fb.message

    def std_over_m(matvec, probes):
        terms = torch.stack([v @ matvec(v) for v in probes])
        return terms.mean(), terms.std() / len(terms)

    fb = check("01.hutchinson", std_over_m)
    assert fb.status == "wrong factor" and "1/sqrt(m)" in fb.message

    def el2n_one_hot_from_labels(model, x, y):  # one_hot(y) sized by the largest label present
        with torch.no_grad():
            p = torch.softmax(model(x), dim=1)
        return (p - F.one_hot(y).to(p)).norm(dim=1)

    fb = check("04.el2n", el2n_one_hot_from_labels)
    assert not fb.passed and fb.case.startswith("10 classes, labels 0-6")

    def cam_resized(model, x, layer, target):
        maps = grad_cam(model, x, layer, target)
        return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]

    fb = check("06.grad_cam", cam_resized)
    assert fb.status == "wrong shape" and "after pooling" in fb.case

    def cam_hook_left(model, x, layer, target):
        saved = {}
        dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: saved.update(a=o))
        logits = model(x)
        (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), saved["a"])
        return torch.relu((g.mean(dim=(2, 3), keepdim=True) * saved["a"]).sum(1)).detach()

    fb = check("06.grad_cam", cam_hook_left)
    assert fb.status == "changed its input" and "hook" in fb.message


def test_a_not_implemented_error_from_torch_is_an_error_not_a_stub():
    def calls_missing_kernel(x):
        raise_inside()

    def raise_inside():
        raise NotImplementedError("no kernel for this op")

    fb = _toy(calls_missing_kernel)
    assert fb.status == "raised" and "no kernel" in fb.message


def test_subspace_forward_reference_takes_a_model_whose_parameters_are_frozen():
    """Notebook 07 hands the reference the network inside a SubspaceModel (parameters frozen):
    the student version, which falls back to the reference, must run on it."""
    from gradcourse.exercises import reference
    from gradcourse.subspace import SubspaceModel

    net = gc.models.MLP(5, [7], 3, seed=0).double()
    sub = SubspaceModel(net, "dense", 4, seed=0)
    theta_d = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        sub.theta_d.copy_(theta_d)
    td = theta_d.clone().requires_grad_(True)
    x = torch.ones(2, 5, dtype=torch.float64)
    td = theta_d.clone().requires_grad_(True)
    got = reference("07.subspace_forward")(sub.model, sub.theta0, sub.projection.matrix(), td, x)
    torch.testing.assert_close(got, sub(x))
    # differentiable in theta_d, as the notebook's fallback needs: the same gradient as sub's
    (g,) = torch.autograd.grad(got.sum(), td)
    (want,) = torch.autograd.grad(sub(x).sum(), sub.theta_d)
    torch.testing.assert_close(g, want)
