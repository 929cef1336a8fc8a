from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradcourse.claims import ClaimFailed, Claims, evaluate, format_table


@pytest.mark.parametrize(
    ("measured", "expected", "compare", "tol", "rtol", "holds"),
    [
        (1.05, 1.0, "close", 0.1, 0, True),
        (1.2, 1.0, "close", 0.1, 0, False),
        (105.0, 100.0, "close", 0, 0.05, True),
        (106.0, 100.0, "close", 0, 0.05, False),
        (3, 3, "==", 0, 0, True),
        (3, 4, "==", 0, 0, False),
        (1.9, 2.0, "<=", 0, 0, True),
        (2.05, 2.0, "<=", 0.1, 0, True),
        (2.2, 2.0, "<=", 0.1, 0, False),
        (2.0, 2.0, "<", 0, 0, False),
        (2.0, 2.0, ">=", 0, 0, True),
        (1.0, 2.0, ">", 0, 0, False),
        (0.5, (0.0, 1.0), "in", 0, 0, True),
        (1.5, (0.0, 1.0), "in", 0, 0, False),
        (math.nan, 1.0, "close", 1e9, 0, False),
        (math.inf, 1.0, ">=", 0, 0, False),
        (math.nan, (0.0, 1.0), "in", 0, 0, False),
        (0.01, math.inf, "<=", 0, 0, True),  # an infinite bound holds every finite value
        (0.01, -math.inf, ">=", 0, 0, True),
    ],
)
def test_evaluate(measured, expected, compare, tol, rtol, holds):
    assert evaluate(measured, expected, compare, tol, rtol) is holds


def test_failed_claim_raises_only_where_required(capsys):
    at_ci = Claims("Paper 2020", profile="ci")
    with pytest.raises(ClaimFailed, match="must hold at profile 'ci'"):
        at_ci.check("x is one", 2.0, 1.0, tol=0.1, holds_at=("ci", "cpu"), kind="paper")
    assert at_ci.verdicts[-1].status == "FAILED"

    at_ci.check("y is one", 2.0, 1.0, tol=0.1, holds_at=("gpu",), kind="paper")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "not reproduced at this scale" in line and "required only at gpu" in line
    assert at_ci.verdicts[-1].status == "not reproduced at this scale"


def test_check_prints_one_line_with_measured_and_expected(capsys):
    claims = Claims("Paper", profile="cpu")
    verdict = claims.check("sharpness near 2/lr", torch.tensor(19.6), 20.0, rtol=0.05, kind="paper")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "19.6" in out[0] and "≈ 20" in out[0] and "reproduced" in out[0]
    assert verdict.holds and verdict.measured == pytest.approx(19.6)


def test_numpy_and_tensor_values_become_plain_json(tmp_path):
    claims = Claims("Paper", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    claims.check("count", np.int64(3), 3, compare="==", kind="paper")
    claims.check(
        "in range", torch.tensor(0.5, dtype=torch.float64), (0, 1), compare="in", kind="paper"
    )
    claims.report()
    record = json.loads((tmp_path / "nb.claims.json").read_text())
    assert record["paper"] == "Paper" and record["profile"] == "ci"
    assert [v["status"] for v in record["verdicts"]] == ["reproduced", "reproduced"]
    assert record["verdicts"][0]["measured"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_rechecking_a_claim_replaces_it():
    claims = Claims("Paper", profile="ci", verbose=False)
    claims.check("a", 1.0, 1.0, kind="paper")
    claims.check("a", 2.0, 2.0, kind="paper")
    assert len(claims.verdicts) == 1 and claims.verdicts[0].measured == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(compare="approx"),
        dict(tol=-1.0),
        dict(holds_at=("laptop",)),
        dict(compare="in"),
        dict(compare="<=", expected="big"),
    ],
)
def test_bad_check_arguments(kwargs):
    claims = Claims("Paper", profile="ci", verbose=False)
    args = dict(name="c", measured=1.0, expected=1.0) | kwargs
    with pytest.raises(ValueError):
        claims.check(**args, kind="paper")


def test_table_counts_every_status():
    claims = Claims("P", profile="ci", verbose=False)
    claims.check("ok", 1.0, 1.0, kind="paper")
    claims.check("small scale", 0.0, 1.0, holds_at=("gpu",), kind="paper")
    table = format_table([claims.record()])
    assert (
        "paper claims: 1 required here, 1 reproduced; 1 report-only (0 reproduced); "
        "sanity checks: 0 of 0 passed" in table
    )
    assert format_table([]) == "(no claims checked)"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_record_gets_ordinary_permissions_and_no_temp_file(tmp_path, umask):
    import os

    old = os.umask(umask)
    try:
        claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
        claims.check("c", 1.0, 1.0, kind="paper")
        claims.report()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "nb.claims.json").st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["nb.claims.json"]


def test_record_is_written_at_every_check_and_finished_by_report(tmp_path):
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    on_disk = lambda: json.loads((tmp_path / "nb.claims.json").read_text())  # noqa: E731
    assert on_disk()["verdicts"] == [] and on_disk()["finished"] is False
    claims.check("a", 1.0, 1.0, kind="paper")
    assert [v["name"] for v in on_disk()["verdicts"]] == ["a"] and not on_disk()["finished"]
    with pytest.raises(ClaimFailed):
        claims.check("b", 3.0, 1.0, holds_at=("ci",), kind="paper")
    assert [v["status"] for v in on_disk()["verdicts"]] == ["reproduced", "FAILED"]
    claims.report()
    assert on_disk()["finished"] is True


def test_kinds_are_counted_apart_and_must_be_given():
    claims = Claims("P", profile="cpu", verbose=False)
    claims.check("paper, required, holds", 1.0, 1.0, kind="paper", holds_at=("cpu",))
    claims.check("paper, report-only, misses", 0.0, 1.0, kind="paper", holds_at=("gpu",))
    claims.check("paper, report-only, holds", 1.0, 1.0, kind="paper", holds_at=())
    claims.check("identity", 0.0, 0.0, tol=1e-9, kind="sanity", paper_value=None)
    with pytest.raises(ClaimFailed):
        claims.check("identity broken", 1.0, 0.0, tol=1e-9, kind="sanity", holds_at=("cpu",))
    line = format_table([claims.record()]).splitlines()[-1]
    assert line == (
        "paper claims: 1 required here, 1 reproduced; 2 report-only (1 reproduced); "
        "sanity checks: 1 of 2 passed; 1 FAILED"
    )
    statuses = [v.status for v in claims.verdicts]
    assert statuses == [
        "reproduced",
        "not reproduced at this scale",
        "reproduced",
        "passed",
        "FAILED",
    ]
    record = claims.record()["verdicts"]
    assert [v["kind"] for v in record] == ["paper"] * 3 + ["sanity"] * 2
    with pytest.raises(TypeError, match="kind"):
        claims.check("no kind", 1.0, 1.0)  # every check says which kind it is
    with pytest.raises(ValueError, match="kind must be one of"):
        claims.check("bad kind", 1.0, 1.0, kind="identity")


def test_paper_value_is_kept_and_shown():
    claims = Claims("Wu, Ma & E 2018", profile="ci", verbose=False)
    claims.check("sharpness x eta / 2", 0.98, 1.0, rtol=0.05, kind="paper", paper_value=0.98)
    assert claims.record()["verdicts"][0]["paper_value"] == 0.98


def test_a_record_that_cannot_be_written_warns_once_and_keeps_the_verdicts(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not write the claims record"):
        claims = Claims("P", notebook="nb", profile="ci", out_dir=blocked / "sub")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        claims.check("a", 1.0, 1.0, kind="paper")
        with pytest.raises(ClaimFailed):  # the verdict, not an OSError
            claims.check("b", 2.0, 1.0, kind="paper", holds_at=("ci",))
        claims.report()
    out = capsys.readouterr().out
    assert "[✗] b" in out and "verdicts written" not in out


def test_write_false_writes_nothing(tmp_path):
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, write=False, verbose=False)
    claims.check("a", 1.0, 1.0, kind="paper")
    claims.report()
    assert list(tmp_path.iterdir()) == []
