"""gradcourse.data.text (stdlib Python source as bytes), the causal transformer and its loss."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradcourse as gc
from gradcourse.data import python_source, stdlib_files, token_windows


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for rel in ("a.py", "b.py", "pkg/c.py", "pkg/d.py", "e.py", "f.py", "g.py", "h.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\nx = 1\n")
    (root / "site-packages" / "z").mkdir(parents=True)
    (root / "site-packages" / "z" / "mod.py").write_text("installed = True\n")
    (root / "notes.txt").write_text("not python\n")
    outside = tmp_path / "outside.py"
    outside.write_text("secret = 1\n")
    (root / "link.py").symlink_to(outside)
    return root


def test_split_is_by_hash_disjoint_and_complete(tmp_path):
    root = _tree(tmp_path)
    train = [p.relative_to(root).as_posix() for p in stdlib_files("train", root=root)]
    val = [p.relative_to(root).as_posix() for p in stdlib_files("validation", root=root)]
    assert not set(train) & set(val)
    everything = {"a.py", "b.py", "pkg/c.py", "pkg/d.py", "e.py", "f.py", "g.py", "h.py"}
    assert set(train) | set(val) == everything  # no site-packages, no symlink out, no .txt
    for rel in everything:
        in_val = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0
        assert (rel in val) == in_val
    assert train == sorted(train)
    assert stdlib_files("train", root=root) == stdlib_files("train", root=root)


def test_tokens_are_the_files_bytes_in_order(tmp_path):
    root = _tree(tmp_path)
    c = python_source("train", root=root)
    want = b"".join((root / f).read_bytes() + b"\n" for f in c.files)
    assert bytes(c.tokens.to(torch.uint8).tolist()) == want
    assert c.tokens.dtype == torch.int64 and c.vocab == 256
    small = python_source("train", root=root, max_bytes=1)
    assert len(small.files) == 1 and small.files[0] == c.files[0]


def test_real_stdlib_split_reads_only_the_stdlib():
    base = Path(sysconfig.get_paths()["stdlib"]).resolve()
    c = python_source("validation", max_bytes=200_000)
    assert len(c) >= 200_000 and Path(c.root) == base
    assert all((base / f).resolve().is_relative_to(base) for f in c.files)
    train = set(python_source("train", max_bytes=2_000_000).files)
    assert not train & set(c.files)


def test_token_windows_shift_by_one():
    tokens = torch.arange(100)
    x, y = token_windows(tokens, 8, 10, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = token_windows(tokens, 8, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="context"):
        token_windows(tokens, 2, 100, generator=torch.Generator())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")
    with pytest.raises(ValueError, match="max_bytes"):
        python_source(max_bytes=0)
    with pytest.raises(FileNotFoundError, match="root"):
        python_source(root=tmp_path / "missing")


def test_transformer_is_causal_and_shaped():
    net = gc.models.CausalTransformer(vocab=11, context=6, width=8, depth=2, heads=2, seed=0)
    x = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    out = net(x)
    assert out.shape == (3, 6, 11)
    x2 = x.clone()
    x2[:, 4] = (x2[:, 4] + 1) % 11
    out2 = net(x2)
    torch.testing.assert_close(out[:, :4], out2[:, :4])  # the past does not see the future
    assert not torch.allclose(out[:, 4:], out2[:, 4:])
    again = gc.models.CausalTransformer(vocab=11, context=6, width=8, depth=2, heads=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True))
    assert gc.models.build_model("causal_transformer", vocab=5, context=3, width=4, heads=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        gc.models.CausalTransformer(width=10, heads=4)
    with pytest.raises(ValueError, match="context"):
        net(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        net(torch.zeros(1, 3))


def test_token_cross_entropy_is_the_mean_over_positions():
    out = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[0, 4, 2], [1, 1, 3]])
    loop = sum(F.cross_entropy(out[i, t][None], y[i, t][None]) for i in range(2) for t in range(3))
    torch.testing.assert_close(gc.losses.token_cross_entropy(out, y), loop / 6)
    with pytest.raises(ValueError, match="targets"):
        gc.losses.token_cross_entropy(out, y[:, :2])
