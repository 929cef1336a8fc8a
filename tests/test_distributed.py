"""gradcourse.distributed on real gloo workers: the launcher, DGC / Gradient Dropping / dense
exchange, and byte accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradcourse import distributed as gd
from gradcourse.distributed import SparseSGD, WorkerError, launch, warmup_lr, warmup_sparsity
from gradcourse.experiments import compression as cx


def test_launcher_refuses_a_local_function():
    def local(rank, world):
        return rank

    with pytest.raises(ValueError, match="top level of an importable module"):
        launch(local, 2)


def test_launcher_returns_results_and_reports_a_worker_error():
    assert launch(cx.echo_worker, 2, "hi") == [(0, 2, "hi"), (1, 2, "hi")]
    with pytest.raises(WorkerError, match=r"worker 1 of 2 raised[\s\S]*boom from rank 1"):
        launch(cx.failing_worker, 2, 1, timeout=10)


def test_an_abort_in_the_shutdown_keeps_the_results_and_a_crash_is_retried_then_reported():
    """Each worker reports its result before the group closes, so a native abort in the
    shutdown (gloo's teardown race, simulated) loses nothing; a worker that dies before its
    report, with no exception, is run once more and then named."""
    assert launch(cx.aborting_worker, 2, "shutdown", timeout=10) == [0, 1]
    with (
        pytest.raises(WorkerError, match=r"1 of 2 workers ended without a result"),
        pytest.warns(RuntimeWarning, match="1 of 2 workers ended without a result.*again"),
    ):
        launch(cx.aborting_worker, 2, "now", timeout=10)


def test_a_port_taken_before_the_group_binds_it_is_retried_on_a_new_one(monkeypatch):
    """The launcher picks a free port, then rank 0 binds it: another process can take it in
    between. That run is started again on a new port; with no retry left it is reported."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter([port, gd._free_port()])
        monkeypatch.setattr(gd, "_free_port", lambda: next(ports))
        with pytest.warns(RuntimeWarning, match="did not form.*EADDRINUSE.*new port"):
            assert launch(cx.echo_worker, 2, "hi", timeout=10) == [(0, 2, "hi"), (1, 2, "hi")]
        monkeypatch.setattr(gd, "_free_port", lambda: port)
        with pytest.raises(WorkerError, match="EADDRINUSE"):
            launch(cx.echo_worker, 2, "hi", timeout=10, retries=0)


def test_exchanges_match_their_single_process_references():
    """One run of 2 workers, 12 steps each on its own gradients, returns every rank's parameters
    for dense, DGC at sparsity 0 without masking, DGC at sparsity 0 with masking, DGC at 0.9 and
    Gradient Dropping at 0.9; compared here with the same updates computed in one process."""
    out = launch(cx.exchange_check_worker, 2, 12)
    for method in out[0]:
        assert torch.equal(out[0][method]["params"], out[1][method]["params"]), method  # replicas
    grads = [cx.synthetic_grads(rank, 12) for rank in range(2)]  # (steps, P) per rank
    mean = (grads[0] + grads[1]) / 2
    lr, m = cx.CHECK_LR, cx.CHECK_MOMENTUM

    # dense and DGC at sparsity 0 without masking: SGD with momentum on the mean gradient
    theta, b = cx.check_start(), torch.zeros_like(mean[0])
    for t in range(12):
        b = mean[t] if t == 0 else m * b + mean[t]
        theta = theta - lr * b
    torch.testing.assert_close(out[0]["dense"]["params"], theta)
    torch.testing.assert_close(out[0]["dgc_s0_nomask"]["params"], theta)
    # with masking at sparsity 0 every coordinate is sent each step: momentum is erased
    plain = cx.check_start() - lr * mean.sum(0)
    torch.testing.assert_close(out[0]["dgc_s0_mask"]["params"], plain)

    # DGC at sparsity 0.9, by hand per worker: momentum correction, accumulation, top-k, masking
    P = mean.shape[1]
    k = math.ceil(0.1 * P)

    def dgc_by_hand(rate):  # rate[t]: the learning rate at step t
        theta = cx.check_start()
        u = [torch.zeros(P), torch.zeros(P)]
        v = [torch.zeros(P), torch.zeros(P)]
        for t in range(12):
            total = torch.zeros(P)
            for r in range(2):
                u[r] = m * u[r] + grads[r][t]
                v[r] = v[r] + u[r]
                idx = v[r].abs().topk(k).indices
                total[idx] += v[r][idx]
                v[r][idx] = 0
                u[r][idx] = 0
            theta = theta - rate[t] * total / 2
        return theta

    torch.testing.assert_close(out[0]["dgc_s90"]["params"], dgc_by_hand([lr] * 12))

    # the same two with the learning rate warmed up over W steps: lr (1 + t / W) / 2 at step t
    W = cx.CHECK_LR_WARMUP
    rate = [lr * (1 + t / W) / 2 if t < W else lr for t in range(12)]
    theta, b = cx.check_start(), torch.zeros_like(mean[0])
    for t in range(12):
        b = mean[t] if t == 0 else m * b + mean[t]
        theta = theta - rate[t] * b
    torch.testing.assert_close(out[0]["dense_lrw"]["params"], theta)
    torch.testing.assert_close(out[0]["dgc_s90_lrw"]["params"], dgc_by_hand(rate))
    assert not torch.allclose(out[0]["dgc_s90_lrw"]["params"], out[0]["dgc_s90"]["params"])

    # Gradient Dropping at 0.9: accumulate g, send top-k, momentum SGD on the sparse sum
    theta, b = cx.check_start(), torch.zeros(P)
    v = [torch.zeros(P), torch.zeros(P)]
    for t in range(12):
        total = torch.zeros(P)
        for r in range(2):
            v[r] = v[r] + grads[r][t]
            idx = v[r].abs().topk(k).indices
            total[idx] += v[r][idx]
            v[r][idx] = 0
        G = total / 2
        b = G if t == 0 else m * b + G
        theta = theta - lr * b
    torch.testing.assert_close(out[0]["gd_s90"]["params"], theta)


def test_bytes_match_the_collectives_traffic():
    out = launch(cx.exchange_check_worker, 2, 3)
    P = cx.CHECK_PARAMS
    dense = out[0]["dense"]
    assert dense["payload"] == 3 * P * 4 and dense["calls"] == 3  # one float32 all-reduce a step
    sparse = out[0]["dgc_s90"]
    k = math.ceil(0.1 * P)
    assert sparse["payload"] == 3 * k * (4 + 4)  # float32 values and int32 indices
    if dense["wire"] is not None:  # Linux: a ring all-reduce of 2 workers writes about B bytes
        assert dense["wire"] >= 3 * P * 4
        assert dense["wire"] <= 3 * (P * 4 + 4096)


def test_warmup_follows_the_papers_schedule():
    assert [warmup_sparsity(s, 0.999, 400) for s in (0, 100, 200, 300, 400)] == pytest.approx(
        [0.75, 0.9375, 0.984375, 0.99609375, 0.999]
    )
    assert warmup_sparsity(5, 0.5, 400) == 0.5  # the warm-up never goes sparser than asked
    with pytest.raises(ValueError, match="final"):
        warmup_sparsity(0, 1.0, 10)


def test_learning_rate_warmup_is_goyals_ramp():
    # from one worker's rate lr / N to N workers' lr, linear in the step, lr from step W on
    assert [warmup_lr(t, 0.1, 4, 100) for t in (0, 50, 99, 100, 500)] == pytest.approx(
        [0.025, 0.0625, 0.1 * (1 + 3 * 0.99) / 4, 0.1, 0.1]
    )
    assert warmup_lr(0, 0.1, 1, 100) == 0.1 and warmup_lr(0, 0.1, 4, 0) == 0.1
    with pytest.raises(ValueError, match="workers"):
        warmup_lr(0, 0.1, 0, 10)
    with pytest.raises(ValueError, match="lr"):
        warmup_lr(0, -0.1, 2, 10)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        SparseSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, lr_warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        cx.config(lr_warmup_steps=-1)


def test_ddp_runs_warm_the_learning_rate_up_too():
    """PowerSGD's DDP optimiser (plain all-reduce before PowerSGD starts) with the rate warmed
    up over 4 of 7 steps: SGD with momentum on the mean gradient at the ramp's rates."""
    steps, W = 7, 4
    out = launch(cx.ddp_lr_check_worker, 2, steps, W)
    assert torch.equal(out[0], out[1])
    mean = (cx.synthetic_grads(0, steps) + cx.synthetic_grads(1, steps)) / 2
    theta, b = cx.check_start(), torch.zeros(cx.CHECK_PARAMS)
    for t in range(steps):
        b = mean[t] if t == 0 else cx.CHECK_MOMENTUM * b + mean[t]
        theta = theta - warmup_lr(t, cx.CHECK_LR, 2, W) * b
    torch.testing.assert_close(out[0], theta)
    theta, b = cx.check_start(), torch.zeros(cx.CHECK_PARAMS)
    for t in range(steps):  # the control: no warm-up, which the check must tell apart
        b = mean[t] if t == 0 else cx.CHECK_MOMENTUM * b + mean[t]
        theta = theta - cx.CHECK_LR * b
    assert not torch.allclose(out[0], theta)


def test_sparse_sgd_checks_its_arguments():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="method"):
        SparseSGD(p, lr=0.1, method="topk")
    with pytest.raises(ValueError, match="sparsity"):
        SparseSGD(p, lr=0.1, sparsity=1.0)
    with pytest.raises(ValueError, match="requires grad"):
        SparseSGD([torch.zeros(3)], lr=0.1)
    assert gd.METHODS == ("dense", "dgc", "gd")


def test_training_workers_stay_replicas_and_count_their_payload():
    """A tiny Fashion-MNIST run of 2 workers: every rank ends with bitwise the same network,
    and DGC's payload per step is sum over tensors of k (values float32 + indices int32)."""
    cfg = cx.config(
        n_train=200, n_test=50, steps=3, batch_size=8, method="dgc", sparsity=0.99, warmup_steps=0
    )
    rec = cx.run(cfg, seed=2)
    assert len(set(rec["digests"])) == 1 and len(rec["losses"]) == 3
    from gradcourse import models

    sizes = [p.numel() for p in models.SmallCNN(in_channels=1, num_classes=10).parameters()]
    per_step = sum(max(1, math.ceil(0.01 * d)) for d in sizes) * (4 + 4)
    assert rec["payload"] == 3 * per_step
    assert rec["gap_counts"].sum() > 0 and 0.0 <= rec["accuracy"] <= 1.0
    surv = rec["age_survival"]  # shares of coordinates unchanged for >= 1, 2, 4, ... steps
    assert 0 < surv[0] <= 1 and (np.diff(surv) <= 0).all() and surv[-1] == 0
    assert 0 < rec["updated_after_warmup"] < 1 and rec["diverged"] is None
    dense = cx.run(cx.config(**{**cfg, "method": "dense"}), seed=2)
    assert dense["payload"] == 3 * sum(sizes) * 4 and len(set(dense["digests"])) == 1
    assert (dense["age_survival"] == 0).all() and dense["updated_after_warmup"] == 1.0


def test_byte_quantiser_round_trip_errs_within_its_bound():
    x = torch.tensor([0.02, -0.5, 1.0, 3.7, -40.0, 1e-6, 0.0, 500.0])
    b = gd.quantise_byte(x)
    assert b.dtype == torch.uint8
    back = gd.dequantise_byte(b)
    inside = (x.abs() >= math.exp(-4)) & (x.abs() <= math.exp(63 / 16))
    rel = ((back - x).abs() / x.abs())[inside]
    assert float(rel.max()) <= math.exp(1 / 32) - 1 + 1e-6
    assert torch.equal(torch.sign(back[x != 0]), torch.sign(x[x != 0]))
    assert back[5] == pytest.approx(math.exp(-4)) and back[7] == pytest.approx(math.exp(63 / 16))
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(gd.quantise_byte(gd.dequantise_byte(codes, torch.float64)), codes)
    with pytest.raises(ValueError, match="finite"):
        gd.quantise_byte(torch.tensor([float("nan")]))


@pytest.mark.parametrize("one_byte", [False, True])
def test_distributed_spsa_equals_the_single_process_replay(one_byte):
    rounds, samples, world = 6, 3, 2
    out = launch(cx.spsa_check_worker, world, rounds, samples, one_byte)
    assert torch.equal(out[0]["theta"], out[1]["theta"])  # replicas
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count: the same floating-point operations
    try:
        losses = [cx.spsa_problem(m) for m in range(world)]
        theta = torch.zeros(30)
        for r in range(rounds):
            est = torch.stack(
                [gd.spsa_estimates(losses[m], theta, r, m, samples, 1e-3) for m in range(world)]
            )
            if one_byte:
                est = gd.dequantise_byte(gd.quantise_byte(est), torch.float64)
            else:
                est = est.to(torch.float32).to(torch.float64)
            theta = gd.spsa_apply(theta, est, r, 0.01)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0]["theta"], theta)
    assert out[0]["payload"] == rounds * samples * (1 if one_byte else 4)
    start = cx.spsa_problem(0)(torch.zeros(30)) + cx.spsa_problem(1)(torch.zeros(30))
    end = cx.spsa_problem(0)(theta) + cx.spsa_problem(1)(theta)
    assert end < start  # it descends


def test_intercept_counts_what_a_hook_sends_and_restores_torch_distributed():
    out = launch(cx.intercept_check_worker, 2)
    for rec in out:
        assert rec["payload"] == 5 * 4 + 3 * 8  # a float32 all-reduce of 5, an int64 gather of 3
        assert rec["calls"] == 2 and rec["restored"]
        assert rec["sum"] == [2.0] * 5


def test_powersgd_at_full_rank_follows_dense_sgd_and_saves_bytes_at_rank_one():
    """torch's PowerSGD hook (the peer) through our worker: at a rank no layer can exceed its
    approximation is exact, so the loss curve follows dense SGD's; at rank 1 it sends less."""
    cfg = cx.config(n_train=200, n_test=50, steps=6, batch_size=8, warmup_steps=0)
    dense, full, low = cx.run_many(
        [
            (cx.config(**{**cfg, "method": "dense"}), 3),
            (cx.config(**{**cfg, "method": "powersgd", "powersgd_rank": 64}), 3),
            (cx.config(**{**cfg, "method": "powersgd", "powersgd_rank": 1}), 3),
        ]
    )
    assert full["losses"] == pytest.approx(dense["losses"], rel=1e-4, abs=1e-5)
    assert len(set(low["digests"])) == 1  # replicas agree
    assert low["payload"] < dense["payload"] and low["calls"] > 0


def test_run_many_refuses_empty_and_mixed_worker_counts():
    with pytest.raises(ValueError, match="empty"):
        cx.run_many([])
    with pytest.raises(ValueError, match="same number of workers"):
        cx.run_many([(cx.config(workers=2), 0), (cx.config(workers=3), 0)])
    with pytest.raises(ValueError, match="method"):
        cx.config(method="topk")
    with pytest.raises(ValueError, match="method"):
        cx.ft_config(method="adam")


def test_finetuning_workers_count_one_byte_per_estimate_and_stay_replicas():
    cfg = cx.ft_config(n_train=200, n_test=50, pretrain_steps=3, rounds=3, samples=2, batch_size=8)
    recs = cx.finetune_many([(cx.ft_config(**{**cfg, "method": m}), 1) for m in cx.FT_METHODS])
    by = dict(zip(cx.FT_METHODS, recs, strict=True))
    for r in recs:
        assert len(set(r["digests"])) == 1  # replicas bitwise equal
        assert r["loss_before"] == by["spsa"]["loss_before"]  # the same pre-trained start
    d = by["spsa"]["params"]
    assert by["spsa_byte"]["payload"] == 3 * 2 * 1 and by["spsa"]["payload"] == 3 * 2 * 4
    assert by["spsa_shuffled"]["payload"] == 3 * 2 * 4
    assert by["backprop"]["payload"] == 3 * d * 4
    assert by["spsa_shuffled"]["digests"][0] != by["spsa"]["digests"][0]


def test_dgc_compress_against_a_sort_by_hand():
    gen = torch.Generator().manual_seed(4)
    g, u, v = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    before = (g.clone(), u.clone(), v.clone())
    sent, u2, v2 = gd.dgc_compress(g, u, v, 0.9, 4)
    u_ref = (0.9 * u + g).flatten().tolist()
    v_ref = [a + b for a, b in zip(v.flatten().tolist(), u_ref, strict=True)]
    top = sorted(range(30), key=lambda i: -abs(v_ref[i]))[:4]
    for i in range(30):
        assert sent.flatten()[i].item() == pytest.approx(v_ref[i] if i in top else 0.0)
        assert v2.flatten()[i].item() == pytest.approx(0.0 if i in top else v_ref[i])
        assert u2.flatten()[i].item() == pytest.approx(0.0 if i in top else u_ref[i])
    _, u3, _ = gd.dgc_compress(g, u, v, 0.9, 4, masking=False)
    assert torch.allclose(u3, 0.9 * u + g)  # no masking: the momentum is kept
    assert all(torch.equal(a, b) for a, b in zip(before, (g, u, v), strict=True))  # not changed
    with pytest.raises(ValueError, match="k"):
        gd.dgc_compress(g, u, v, 0.9, 31)
    with pytest.raises(ValueError, match="one shape"):
        gd.dgc_compress(g, u[:3], v, 0.9, 2)


def test_a_diverging_run_stops_on_every_worker_at_the_same_step():
    cfg = cx.config(
        n_train=200, n_test=50, steps=30, batch_size=8, method="dense", lr=1e6, warmup_steps=0
    )
    rec = cx.run(cfg, seed=0)
    assert rec["diverged"] is not None and rec["diverged"] < 30
    assert len(rec["losses"]) == rec["diverged"] and len(set(rec["digests"])) == 1
