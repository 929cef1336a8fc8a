"""The paper-scale (``gpu`` profile) code paths of notebooks 02, 03 and 04, run end to end at tiny
size and offline: the real datasets (CIFAR-10, MNIST) come from small fake files in torchvision's
on-disk formats (writers in conftest.py) under ``$GRADCOURSE_DATA``, the architectures and call
sequences are those of the notebooks' ``gpu`` configurations (ResNet-18 on CIFAR-10; the wider
SmallCNN of the MNIST-1D fallback). Without these tests those branches only ever run on a GPU
machine with the datasets on disk."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcourse import data as D
from gradcourse import models, scores, stability
from gradcourse.cache import Cache
from gradcourse.experiments import data_diet as dd
from gradcourse.experiments import ntk as nx
from gradcourse.experiments import stability as sx

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
CPU = torch.device("cpu")  # the notebooks pass P.device


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: extra threads only wait on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    root = tmp_path / "gc_data"
    monkeypatch.setenv("GRADCOURSE_DATA", str(root))
    return root


def notebook_config(notebook: str, profile: str) -> dict:
    """The ``cfg = P.pick(...)`` of ``notebook``, evaluated for one profile (no CUDA needed)."""
    path = NOTEBOOKS / notebook
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "cfg":
                call = node.value
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "pick":
                    profiles = {kw.arg: kw.value for kw in call.keywords}
                    return eval(compile(ast.Expression(profiles[profile]), str(path), "eval"))
    raise AssertionError(f"no cfg = P.pick(...) in {notebook}")


def cifar_train_arrays(written):
    """Training pixels (n, 3072) uint8 and labels as written, in torchvision's order."""
    pixels = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    return pixels, torch.tensor(labels)


def standardized_cifar(pixels):
    """pixels / 255 standardised per channel with the statistics of all of ``pixels``, flat."""
    x = pixels.reshape(len(pixels), 3, 1024) / 255.0
    mean, std = x.mean((0, 2), keepdims=True), x.std((0, 2), keepdims=True)
    return torch.from_numpy(((x - mean) / std).reshape(len(pixels), 3072))


def assert_finite(result, keys):
    for key in keys:
        assert torch.isfinite(torch.as_tensor(result[key], dtype=torch.float64)).all(), key


def hand_top_k_precision(res, epoch):
    """The notebook's label-noise statistic from the raw scores: EL2N at ``epoch`` averaged over
    the score seeds, its k = (number flipped) highest, and the count of flipped labels among
    them, over k."""
    el2n = res["el2n"][res["epochs"].tolist().index(epoch)].double().mean(0)
    flipped = res["flipped"].bool()
    k = int(flipped.sum())
    order = sorted(range(len(el2n)), key=lambda i: -float(el2n[i]))
    assert float(el2n[order[k - 1]]) > float(el2n[order[k]])  # no tie at the cut
    return sum(bool(flipped[i]) for i in order[:k]) / k


# ---------------------------------------------------------------------------------------------
# Notebook 04: Data Diet at the gpu profile


SCORE_KEYS = ("el2n", "grand", "forgetting", "input_norm", "test_accuracy")


def test_data_diet_gpu_profile_resnet18_on_cifar10(data_dir, write_fake_cifar10, tmp_path):
    gpu = notebook_config("04_data_diet.ipynb", "gpu")
    paper = gpu["cifar"]  # used for sections 1 and 2 when CIFAR-10's files are on disk
    assert (paper["dataset"], paper["arch"]) == ("cifar10", "resnet18")
    assert not dd.available("cifar10")  # no files: the notebook takes its fallback
    written = write_fake_cifar10(data_dir)  # 5 x 20 training, 20 test images
    assert dd.available("cifar10")
    n, early = 10, gpu["early"]
    cfg = dd.config(
        **{**paper, "n_train": n, "n_test": 10, "epochs": 1, "batch_size": 5, "score_seeds": (0,)}
    )
    assert cfg["score_epochs"] == (0, early) == (0, 1)  # the gpu's own scored epochs
    cache = Cache(tmp_path / "cache")

    res = dd.cached_scores(cfg, cache=cache, device=CPU)
    assert res["epochs"].tolist() == [0, 1] and int(res["steps"]) == 2
    assert res["el2n"].shape == res["grand"].shape == (2, 1, n)
    assert res["forgetting"].shape == (1, n) and res["input_norm"].shape == (n,)
    assert res["test_accuracy"].shape == (1,) and res["labels"].shape == (n,)
    assert_finite(res, SCORE_KEYS)
    assert (res["el2n"] >= 0).all() and (res["el2n"] <= math.sqrt(2) + 1e-6).all()
    assert (res["grand"] > 0).all() and not res["flipped"].any()
    # the data are the fake CIFAR-10 images: a balanced subset, standardised per channel
    pixels, labels = cifar_train_arrays(written)
    idx = D.balanced_subset_indices(labels, n, seed=cfg["data_seed"])
    assert torch.equal(res["labels"], labels[idx]) and sorted(res["labels"].tolist()) == list(
        range(10)
    )
    expected = standardized_cifar(pixels)[idx]
    torch.testing.assert_close(res["input_norm"], expected.norm(dim=1), rtol=1e-5, atol=0)
    # and the network is the ResNet-18: epoch-0 EL2N is that of a fresh ResNet-18 (seed 0)
    net = dd.make_model(cfg, (3, 32, 32), 10, seed=0)
    assert isinstance(net, models.ResNet18) and models.count_params(net) > 11_000_000
    images = expected.float().reshape(n, 3, 32, 32)
    fresh = scores.el2n_scores(net, images, labels[idx])
    # epoch 0 scores the fresh network: train() calls back before the step's forward pass,
    # which would move BatchNorm's running statistics
    torch.testing.assert_close(res["el2n"][0, 0], fresh.double(), rtol=1e-4, atol=1e-5)
    # GraNd of ResNet-18 (the linear trick through residual blocks, projection shortcuts and
    # BatchNorm with non-trivial running statistics) = one backward pass per example, eval mode
    with torch.no_grad():
        net.train()(images * 2 + 0.5)  # moves every BatchNorm's running mean and variance
    grand = scores.grand_scores(net, images[:3], labels[idx][:3])
    net.eval()
    for i in range(3):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(images[i : i + 1]), labels[idx][i : i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters()))
        assert grand[i].item() == pytest.approx(norm.item(), rel=1e-3)

    # the notebook's score cells
    named = {
        f"EL2N@{early}": dd.method_scores(res, "el2n", early),
        f"GraNd@{early}": dd.method_scores(res, "grand", early),
        "GraNd@0": dd.method_scores(res, "grand", 0),
        "forgetting": dd.method_scores(res, "forgetting"),
        "input norm": dd.method_scores(res, "input_norm"),
    }
    assert all(s.shape == (n,) for s in named.values())
    names, rho = scores.spearman_matrix(named)
    assert rho.shape == (5, 5) and names == list(named)
    assert math.isfinite(scores.spearman(named["GraNd@0"], named["input norm"]))

    # pruning curves (two of the notebook's methods: the retraining path is the same for all)
    assert 0.5 in gpu["fractions"]
    curves = {
        dd.curve_key(m, e): dd.prune_curve(cfg, m, e, (0.5,), (0,), cache=cache, device=CPU)
        for m, e in (("el2n", early), ("random", None))
    }
    for curve in curves.values():
        assert curve["accuracy"].shape == (1, 1) and curve["fractions"].tolist() == [0.5]
        # an accuracy counted over the n_test = 10 clean test images: a multiple of 1/10 (the
        # retraining itself is only checked to run end to end here; at 2 steps a ResNet-18 is
        # close to a constant classifier, so its accuracy says nothing about the training)
        correct = float(curve["accuracy"][0, 0]) * cfg["n_test"]  # counted in float32
        assert correct == pytest.approx(round(correct), abs=1e-5) and 0 <= round(correct) <= 10
    pairs = [
        dd.accuracy_at(dd.find_curve(curves, "el2n", early), 0.5),
        dd.accuracy_at(curves["random"], 0.5),
    ]
    assert all(p.shape == (1,) and torch.isfinite(p).all() for p in pairs)

    # label noise: scores of the noisy data, top-k precision, the window curve
    noise = gpu["noisy"]["noise"]
    noisy_cfg = dd.config(**{**cfg, "noise": noise})
    res_noisy = dd.cached_scores(noisy_cfg, cache=cache, device=CPU)
    flipped = res_noisy["flipped"]
    assert int(flipped.sum()) == round(noise * n) == 2
    assert (res_noisy["labels"][flipped] != res["labels"][flipped]).all()
    assert_finite(res_noisy, SCORE_KEYS)
    precision = dd.top_k_precision(dd.method_scores(res_noisy, "el2n", early), flipped)
    assert precision == hand_top_k_precision(res_noisy, early)
    window = dd.prune_curve(
        noisy_cfg, "el2n", early, (0.5,), (0,), offset=noise, cache=cache, device=CPU
    )
    assert window["accuracy"].shape == (1, 1) and torch.isfinite(window["accuracy"]).all()


def test_data_diet_unavailable_cifar10_raises_the_data_error(data_dir):
    """Without the files, load_data says where they go (the notebook checks available first)."""
    cfg = dd.config(dataset="cifar10", arch="resnet18", n_train=10, n_test=10, batch_size=5)
    with pytest.raises(D.DatasetUnavailable, match="cifar-10-batches-py"):
        dd.load_data(cfg)


def test_data_diet_gpu_profile_small_cnn_on_fashion_mnist(data_dir, tmp_path):
    """The gpu profile's own setting (no CIFAR-10 files): the 2-D small CNN on Fashion-MNIST,
    at toy size, through scoring, balanced pruning, the per-class accuracies and label noise."""
    gpu = notebook_config("04_data_diet.ipynb", "gpu")
    paper = gpu["data"]
    assert (paper["dataset"], paper["arch"]) == ("fashion_mnist", "small_cnn")
    assert (paper["channels"], paper["hidden"], paper["n_train"]) == ((32, 64), 128, 60_000)
    n, early = 40, gpu["early"]
    cfg = dd.config(
        **{**paper, "n_train": n, "n_test": 30, "epochs": 2, "batch_size": 20,
           "score_seeds": (0, 1)}
    )  # fmt: skip
    cache = Cache(tmp_path / "cache")
    res = dd.cached_scores(cfg, cache=cache, device=CPU)
    assert res["epochs"].tolist() == [0, early] and int(res["steps"]) == 2 * 2
    assert res["el2n"].shape == res["grand"].shape == (2, 2, n)
    assert_finite(res, SCORE_KEYS)
    assert (res["grand"] > 0).all()
    ds, _ = dd.load_data(cfg)
    assert ds.input_shape == (1, 28, 28) and ds.name == "fashion_mnist" and ds.n_test == 30
    net = dd.make_model(cfg, ds.input_shape, 10, seed=1)
    assert isinstance(net, models.SmallCNN)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert all(c.bias.abs().max() > 0 for c in convs)  # claim 6 uses these biases as they are
    torch.testing.assert_close(
        res["grand"][0, 1], scores.grand_scores(net, ds.x_train, ds.y_train).double()
    )
    curve = dd.prune_curve(cfg, "el2n", early, (0.5,), (0, 1), balanced=True, cache=cache,
                           device=CPU)  # fmt: skip
    assert curve["accuracy"].shape == (1, 2) and curve["class_accuracy"].shape == (1, 2, 10)
    noisy_cfg = dd.config(**{**cfg, "noise": gpu["noisy"]["noise"]})
    res_noisy = dd.cached_scores(noisy_cfg, cache=cache, device=CPU)
    assert int(res_noisy["flipped"].sum()) == 8
    precision = dd.top_k_precision(dd.method_scores(res_noisy, "el2n", early), res_noisy["flipped"])
    assert precision == hand_top_k_precision(res_noisy, early)


# ---------------------------------------------------------------------------------------------
# Notebook 02: the gpu profile (Fashion-MNIST at the papers' scale), and the CIFAR-10 loader


def test_stability_gpu_profile_runs_its_paths_at_toy_scale(tmp_path):
    gpu = notebook_config("02_sgd_stability.ipynb", "gpu")
    assert gpu["eos"]["dataset"] == "fashion_mnist" and gpu["wme"]["n"] == 1000
    assert gpu["wme_lrs"] == [0.5, 0.1, 0.05]  # all three of Wu, Ma & E's learning rates
    cache = Cache(tmp_path / "cache")
    eos = dict(gpu["eos"], n=20, widths=(16,), steps=8, every=2, every_early=4)
    run = sx.sharpness_run(lr=gpu["eos_lrs"][0], device="cpu", cache=cache, **eos)
    assert run["diverged_at"] == -1 and list(run["sharp_step"]) == [0, 4, 6, 8]
    assert np.isfinite(run["sharpness"]).all() and (run["sharpness"] > 0).all()
    wme = sx.converged_sharpness(lr=gpu["wme_lrs"][0], n=20, widths=(16,), max_steps=20,
                                 loss_tol=1e-9, device="cpu", cache=cache)  # fmt: skip
    assert wme["steps"] == 20 and not wme["converged"] and wme["sharpness"] > 0


def test_cifar10_classification_loader(data_dir, write_fake_cifar10, tmp_path):
    assert sx.eos_dataset("cifar10")[0] == "mnist1d"  # no files yet: the fallback
    written = write_fake_cifar10(data_dir, per_batch=20, n_test=100)
    dataset, note = sx.eos_dataset("cifar10")
    assert (dataset, note) == ("cifar10", "CIFAR-10")
    lrs = {"cifar10": [0.01, 0.02, 0.04], "mnist1d": [0.05]}
    assert sx.for_dataset(lrs, dataset) == [0.01, 0.02, 0.04]

    # load_classification: the balanced subset, flattened, every pixel feature standardised
    # over the subset (Cohen et al.'s cifar10-5k preparation)
    pixels, labels = cifar_train_arrays(written)
    (x, y), note = sx.load_classification("cifar10", 20)
    assert note == "CIFAR-10, 20 examples"
    assert x.shape == (20, 3072) and x.dtype == torch.float32 and y.dtype == torch.int64
    idx = D.balanced_subset_indices(labels, 20, seed=0)
    assert torch.equal(y, labels[idx]) and torch.bincount(y).tolist() == [2] * 10
    raw = torch.from_numpy(pixels[idx.numpy()]).double() / 255.0
    expected = (raw - raw.mean(0)) / raw.std(0)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(x.mean(0), torch.zeros(3072), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.std(0), torch.ones(3072), rtol=0, atol=1e-4)

    # a short sharpness run on the 3072-dim inputs
    lr = sx.for_dataset(lrs, dataset)[0]
    eos = dict(dataset=dataset, n=20, widths=(16,), steps=8, every=2, every_early=4)
    run = sx.sharpness_run(lr=lr, device="cpu", cache=Cache(tmp_path / "cache"), **eos)
    assert run["note"] == "CIFAR-10, 20 examples" and run["diverged_at"] == -1
    assert list(run["sharp_step"]) == [0, 4, 6, 8]  # every_early before 3/4 of the run
    assert np.isfinite(run["sharpness"]).all() and (run["sharpness"] > 0).all()
    assert np.isfinite(run["loss"]).all() and len(run["loss"]) >= 2
    # the first sharpness is that of the fresh fc-tanh net on the CIFAR-10 inputs (d = 3072)
    net = models.MLP(3072, [16], 10, activation="tanh", seed=0)
    first = stability.SharpnessTracker(x, y, seed=0)(0, net)["sharpness"]
    assert run["sharpness"][0] == pytest.approx(first, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Notebook 03: Fig. 3 on MNIST


def test_ntk_fig3_gpu_profile_on_mnist(data_dir, write_fake_mnist, tmp_path):
    gpu = notebook_config("03_neural_tangent_kernel.ipynb", "gpu")
    assert gpu["fig3_dataset"] == "mnist"
    with pytest.raises(D.DatasetUnavailable):  # what the notebook catches to fall back
        nx.pc_inputs(20, dataset="mnist")
    n = 20
    arrays = write_fake_mnist(data_dir, n_train=n, n_test=10)
    x = nx.pc_inputs(n, dataset="mnist")
    images = arrays["train"][0].reshape(n, 784) / 255.0  # all n: the balanced subset is everything
    expected = torch.from_numpy(images)  # pixels / 255 and nothing else, as in the paper
    assert x.shape == (n, 784) and x.dtype == torch.float64
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)

    steps, coeffs = 20, [0.0, 0.5, 0.0, 0.0]
    pc_config = dict(
        dataset="mnist", n=n, depth=nx.PAPER_DEPTH, beta=nx.PAPER_BETA, steps=steps, lr=1.0
    )
    cache = Cache(tmp_path / "cache")
    widths = (16, 64)
    fig3 = {
        w: nx.cached(
            cache, "ntk-pc-run", nx.pc_experiment, width=w, coeffs=coeffs, device=CPU, **pc_config
        )
        for w in widths
    }
    reference = nx.kernel_pcs(expected, k=4)  # the limiting kernel of the MNIST inputs
    for r in fig3.values():
        assert r["proj"].shape == (steps + 1, 4) and r["orth"].shape == (steps + 1,)
        assert r["eigvals"].shape == (4,) and r["pcs"].shape == (4, n)
        assert_finite(r, ("proj", "orth", "loss", "eigvals", "pcs"))
        assert torch.equal(r["proj"][0], torch.zeros(4)) and r["loss"][-1] < r["loss"][0]
        torch.testing.assert_close(r["eigvals"], reference["eigvals"])
        torch.testing.assert_close(r["pcs"].pow(2).mean(1), torch.ones(4, dtype=torch.float64))
    lam = fig3[widths[0]]["eigvals"]
    assert (lam > 0).all() and (lam[:-1] >= lam[1:]).all()
    assert 1.0 * lam[0] < 2  # GD at the notebook's lr = 1 is stable on these inputs
    pred = nx.pc_prediction(lam, coeffs, lr=1.0, steps=steps)
    deviation = {w: nx.line_deviation(r, pred) for w, r in fig3.items()}
    assert all(d.shape == (steps + 1,) and torch.isfinite(d).all() for d in deviation.values())
    all4 = [0.5] * 4
    multi = nx.cached(
        cache, "ntk-pc-run", nx.pc_experiment, width=64, coeffs=all4, device=CPU, **pc_config
    )
    t_half = nx.half_times(multi["proj"], all4)
    assert t_half.shape == (4,) and t_half[0] < math.inf  # PC1 (the largest) is half-learnt


def test_dp_clipping_gpu_profile_tanh_cnn(tmp_path):
    """Notebook 05's gpu profile: Papernot et al.'s tanh CNN on Fashion-MNIST images (not
    flattened), at toy size, for DP-SGD and DiceSGD at the notebook's budget; the clipped sums
    of the CNN go through the per-example norms of pergrad (checked against a loop in
    test_privacy)."""
    from gradcourse.experiments import privacy as px

    gpu = notebook_config("05_dp_clipping_bias.ipynb", "gpu")
    paper = gpu["fashion"]
    assert (paper["arch"], paper["n_train"]) == ("tanh_cnn", 60_000)
    cfg = px.config(**{**paper, "n_train": 64, "n_test": 32, "epochs": 1, "batch_size": 16})
    ds = px.load_data(cfg)
    assert ds.x_train.shape[1:] == (1, 28, 28)
    cache = Cache(tmp_path / "cache")
    for method in ("dpsgd", "dice"):
        r = px.cached_run(cfg, method, 0.1, 3.0, gpu["seeds"][0], cache=cache, device=CPU)
        assert r["steps"] == 4 and np.isfinite(r["curve"]).all()
        assert r["sigma"] == pytest.approx(px.sigma_for(cfg, method, 0.1, 3.0))


def test_input_gradients_gpu_profile_configs(tmp_path):
    """Notebook 06's gpu profile: its configurations are accepted (all 12,000 training images of
    the two classes) and its CNN trains adversarially and is attributed, at toy size."""
    from gradcourse.experiments import attribution as ax

    gpu = notebook_config("06_input_gradients.ipynb", "gpu")
    for arch, key in (("mlp", "mlp"), ("small_cnn", "cnn")):
        full = ax.config(**gpu["data"], **gpu[key], arch=arch, eps=0.1)
        assert full["n_train"] == 12_000 and full["epochs"] == 10
    toy = ax.config(**{**gpu["data"], "n_train": 60, "n_test": 20}, **{**gpu["cnn"], "epochs": 1, "pgd_steps": 2},
                    arch="small_cnn", eps=0.1, batch_size=20)  # fmt: skip
    model, rec = ax.cached_model(toy, gpu["seeds"][0], cache=Cache(tmp_path / "cache"), device=CPU)
    ds, _, top = ax.load_blocks(toy)
    for method in ax.METHODS:
        mass = ax.attribution_mass(model, ds.x_test, ds.y_test, top, method, samples=2)
        assert mass.shape == (20,)


def test_intrinsic_dimension_gpu_profile_configs(tmp_path):
    """Notebook 07's gpu profile: its configurations are accepted (all 60,000 training images),
    every grid is increasing, and a subspace run with its settings trains at toy size."""
    from gradcourse.experiments import intrinsic as ix

    gpu = notebook_config("07_intrinsic_dimension.ipynb", "gpu")
    full = ix.config(**gpu["data"], arch="lenet", d=max(gpu["lenet_shuffled"]))
    assert full["n_train"] == 60_000 and full["n_test"] == 10_000
    for key in ("fc", "lenet", "lenet_shuffled"):
        assert list(gpu[key]) == sorted(set(gpu[key]))
    mem = gpu["memorise"]
    ix.config(
        **{**gpu["data"], "n_train": mem["n_train"], "epochs": mem["epochs"]}, random_labels=True
    )
    toy = ix.config(
        **{**gpu["data"], "n_train": 60, "n_test": 20, "epochs": 1}, batch_size=20, d=gpu["fc"][0]
    )
    rec = ix.cached_run(toy, gpu["seeds"][-1], cache=Cache(tmp_path / "cache"), device=CPU)
    assert rec["steps"] == 3 and 0.0 <= rec["accuracy"] <= 1.0


def test_scale_invariance_gpu_profile_configs(tmp_path):
    """Notebook 08's gpu profile: its configurations are accepted (all 60,000 training images,
    every optimiser and weight decay of the notebook), and a run with its settings trains at toy
    size."""
    from gradcourse.experiments import scale as sx

    gpu = notebook_config("08_scale_invariance.ipynb", "gpu")
    assert gpu["data"]["n_train"] == 60_000 and len(gpu["seeds"]) >= 5
    for opt in sx.OPTIMIZERS:
        sx.config(**gpu["data"], optimizer=opt)
    toy = sx.config(
        **{**gpu["data"], "n_train": 64, "n_test": 20, "epochs": 1}, width=8, batch_size=32
    )
    rec = sx.cached_run(toy, gpu["seeds"][-1], cache=Cache(tmp_path / "cache"), device=CPU)
    assert len(rec["steps"]) >= 1 and 0.0 <= rec["accuracy"] <= 1.0


def test_adam_vs_sgd_gpu_profile_configs(tmp_path):
    """Notebook 09's gpu profile: its configurations are accepted (the larger transformer, every
    optimiser, the MLP control on all 60,000 images), and a trajectory and a training run with
    its settings run at toy size."""
    from gradcourse.experiments import adam_sgd as ax

    gpu = notebook_config("09_adam_vs_sgd_transformers.ipynb", "gpu")
    assert gpu["data"]["n_train"] == 60_000 and len(gpu["train_seeds"]) >= 5
    for opt in ax.OPTIMISERS:
        ax.config(**gpu["data"], optimizer=opt)
    ax.config(**{**gpu["data"], "task": "mlp"})
    small = dict(corpus_bytes=20_000, batch_size=2, steps=2, every=2, pretrain_steps=1)
    toy = ax.config(**{**gpu["data"], **small, "width": 8, "heads": 2, "depth": 1, "context": 16})
    cache = Cache(tmp_path / "cache")
    rec = ax.cached_trajectories({0: (toy, gpu["seeds"][-1])}, cache=cache, device=CPU)[0]
    assert rec["S"].shape[0] == 1 and np.isfinite(rec["S"]).all()
    run = ax.cached_trainings({0: (toy, gpu["train_seeds"][-1])}, cache=cache, device=CPU)[0]
    assert not run["diverged"]


def test_gradient_compression_gpu_profile_configs(tmp_path):
    """Notebook 12's gpu profile: its configurations are accepted (4 workers, all 60,000 images,
    every method and fine-tuning method), and a run of 4 real workers with its settings, at toy
    length, stays replicated and is stored in the cache."""
    from gradcourse.experiments import compression as cx

    gpu = notebook_config("12_gradient_compression.ipynb", "gpu")
    assert gpu["train"]["n_train"] == 60_000 and gpu["train"]["workers"] == 4
    assert len(gpu["seeds"]) >= 5 and len(gpu["tune_seeds"]) >= 5
    for method in cx.TRAIN_METHODS:
        cx.config(**{**gpu["train"], "method": method})
    for method in cx.FT_METHODS:
        cx.ft_config(**{**gpu["tune"], "method": method})
    toy = cx.config(**{**gpu["train"], "n_train": 200, "n_test": 40, "steps": 4, "warmup_steps": 2})
    cache = Cache(tmp_path / "cache")
    (rec,) = cx.run_many([(toy, gpu["seeds"][-1])], cache=cache)
    assert len(rec["digests"]) == 4 and len(set(rec["digests"])) == 1
    assert cx.run_many([(toy, gpu["seeds"][-1])], cache=cache)[0]["digests"] == rec["digests"]
