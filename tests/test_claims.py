from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradcourse.claims import ClaimFailed, Claims, bound, control, evaluate, format_table, rival

# what would refute the test claims: a rival value outside its band (discriminating)
REFUTE = rival("no effect", 0.0, band=(1.0, 2.0))


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
        at_ci.check(
            "x is one", 2.0, 1.0, tol=0.1, holds_at=("ci", "cpu"), kind="paper", refute=REFUTE
        )
    assert at_ci.verdicts[-1].status == "FAILED"

    at_ci.check("y is one", 2.0, 1.0, tol=0.1, holds_at=("gpu",), kind="paper", refute=REFUTE)
    line, refuted = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "not reproduced at this scale" in line and "required only at gpu" in line
    assert (
        refuted == "    refuted by: rival no effect: 0.0 against the band [1, 2] -> discriminates"
    )
    assert at_ci.verdicts[-1].status == "not reproduced at this scale"


def test_check_prints_one_line_with_measured_and_expected(capsys):
    claims = Claims("Paper", profile="cpu")
    verdict = claims.check(
        "sharpness near 2/lr", torch.tensor(19.6), 20.0, rtol=0.05, kind="paper", refute=REFUTE
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        len(out) == 2
        and out[1].startswith("    refuted by: rival")
        and "19.6" in out[0]
        and "≈ 20" in out[0]
        and "reproduced" in out[0]
    )
    assert verdict.holds and verdict.measured == pytest.approx(19.6)


def test_numpy_and_tensor_values_become_plain_json(tmp_path):
    claims = Claims("Paper", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    claims.check("count", np.int64(3), 3, compare="==", kind="paper", refute=REFUTE)
    claims.check(
        "in range",
        torch.tensor(0.5, dtype=torch.float64),
        (0, 1),
        compare="in",
        kind="paper",
        refute=REFUTE,
    )
    claims.report()
    record = json.loads((tmp_path / "nb.claims.json").read_text())
    assert record["paper"] == "Paper" and record["profile"] == "ci"
    assert [v["status"] for v in record["verdicts"]] == ["reproduced", "reproduced"]
    assert record["verdicts"][0]["measured"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_rechecking_a_claim_replaces_it():
    claims = Claims("Paper", profile="ci", verbose=False)
    claims.check("a", 1.0, 1.0, kind="paper", refute=REFUTE)
    claims.check("a", 2.0, 2.0, kind="paper", refute=REFUTE)
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
        claims.check(**args, kind="paper", refute=REFUTE)


def test_table_counts_every_status():
    claims = Claims("P", profile="ci", verbose=False)
    claims.check("ok", 1.0, 1.0, kind="paper", refute=REFUTE)
    claims.check("small scale", 0.0, 1.0, holds_at=("gpu",), kind="paper", refute=REFUTE)
    table = format_table([claims.record()])
    assert (
        "paper claims: 1 required here, 1 reproduced; 1 report-only (0 reproduced); "
        "2 of 2 discriminating; sanity checks: 0 of 0 passed" in table
    )
    assert format_table([]) == "(no claims checked)"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_record_gets_ordinary_permissions_and_no_temp_file(tmp_path, umask):
    import os

    old = os.umask(umask)
    try:
        claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
        claims.check("c", 1.0, 1.0, kind="paper", refute=REFUTE)
        claims.report()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "nb.claims.json").st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["nb.claims.json"]


def test_record_is_written_at_every_check_and_finished_by_report(tmp_path):
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    on_disk = lambda: json.loads((tmp_path / "nb.claims.json").read_text())  # noqa: E731
    assert on_disk()["verdicts"] == [] and on_disk()["finished"] is False
    claims.check("a", 1.0, 1.0, kind="paper", refute=REFUTE)
    assert [v["name"] for v in on_disk()["verdicts"]] == ["a"] and not on_disk()["finished"]
    with pytest.raises(ClaimFailed):
        claims.check("b", 3.0, 1.0, holds_at=("ci",), kind="paper", refute=REFUTE)
    assert [v["status"] for v in on_disk()["verdicts"]] == ["reproduced", "FAILED"]
    claims.report()
    assert on_disk()["finished"] is True


def test_kinds_are_counted_apart_and_must_be_given():
    claims = Claims("P", profile="cpu", verbose=False)
    claims.check("paper, required, holds", 1.0, 1.0, kind="paper", refute=REFUTE, holds_at=("cpu",))
    claims.check(
        "paper, report-only, misses", 0.0, 1.0, kind="paper", refute=REFUTE, holds_at=("gpu",)
    )
    claims.check("paper, report-only, holds", 1.0, 1.0, kind="paper", refute=REFUTE, holds_at=())
    claims.check("identity", 0.0, 0.0, tol=1e-9, kind="sanity", paper_value=None)
    with pytest.raises(ClaimFailed):
        claims.check("identity broken", 1.0, 0.0, tol=1e-9, kind="sanity", holds_at=("cpu",))
    line = format_table([claims.record()]).splitlines()[-1]
    assert line == (
        "paper claims: 1 required here, 1 reproduced; 2 report-only (1 reproduced); "
        "3 of 3 discriminating; sanity checks: 1 of 2 passed; 1 FAILED"
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
    claims.check(
        "sharpness x eta / 2", 0.98, 1.0, rtol=0.05, kind="paper", refute=REFUTE, paper_value=0.98
    )
    assert claims.record()["verdicts"][0]["paper_value"] == 0.98


def test_a_record_that_cannot_be_written_warns_once_and_keeps_the_verdicts(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not write the claims record"):
        claims = Claims("P", notebook="nb", profile="ci", out_dir=blocked / "sub")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        claims.check("a", 1.0, 1.0, kind="paper", refute=REFUTE)
        with pytest.raises(ClaimFailed):  # the verdict, not an OSError
            claims.check("b", 2.0, 1.0, kind="paper", refute=REFUTE, holds_at=("ci",))
        claims.report()
    out = capsys.readouterr().out
    assert "[✗] b" in out and "verdicts written" not in out


def test_write_false_writes_nothing(tmp_path):
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, write=False, verbose=False)
    claims.check("a", 1.0, 1.0, kind="paper", refute=REFUTE)
    claims.report()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# What would have refuted a paper claim


@pytest.mark.parametrize(
    ("refutation", "compare", "expected", "discriminates"),
    [
        # a control on which the same check fails: discriminating
        (control("a random half", -1.5), ">=", -1.0, True),
        # ... on which it passes too: not discriminating (04's "matches full data")
        (control("a random half", -0.88), ">=", -1.0, False),
        (control("an untrained net", 0.55), "<", 2 / 3, False),
        (control("an untrained net", 0.9), "<", 2 / 3, True),
        (control("GD instead of SGD", 1.2), "in", (0.9, 1.15), True),
        (control("GD instead of SGD", 1.0), "in", (0.9, 1.15), False),
        (control("the other variant", False), "==", True, True),
        (control("the other variant", True), "==", True, False),
        # a control that could not be measured shows nothing
        (control("a control", math.nan), ">", 0.0, False),
        (control("a control", math.inf), "<", 0.0, False),
        # a rival excluded by the measured band, or not
        (rival("slope -1", -1.0, band=(-0.7, -0.4)), "<=", 0.15, True),
        (rival("slope -1/2", -0.5, band=(-0.7, -0.4)), "<=", 0.15, False),
        (rival("no effect", 0.0, band=(math.nan, 1.0)), ">", 0.0, False),
        # a rival with no band: the check itself must fail on the rival's value
        (rival("GD's bound", 2.0, band=None), "<=", 1.0, True),
        (rival("a loose rival", 0.5, band=None), "<=", 1.0, False),
        # a bound that binds, does not, or whose predicted violation was seen
        (bound("2/eta", 1.05, near=1.2), "<=", 1.0, True),
        (bound("2/eta", 1.81, near=1.2), "<=", 1.0, False),
        (bound("2/eta", 1.81, near=1.2, violation=True), "<=", 1.0, True),
        (bound("2/eta", 1.81, near=1.2, violation=False), "<=", 1.0, False),
        (bound("2/eta", math.nan, near=1.2), "<=", 1.0, False),
    ],
)
def test_a_refutation_discriminates_when_the_check_could_have_failed(
    refutation, compare, expected, discriminates
):
    claims = Claims("P", profile="cpu", verbose=False)
    measured = expected[0] if compare == "in" else expected
    verdict = claims.check(
        "claim", measured, expected, compare=compare, kind="paper", refute=refutation,
        holds_at=(),
    )  # fmt: skip
    assert verdict.discriminating is discriminates
    (stored,) = claims.record()["verdicts"][0]["refutations"]
    assert stored["discriminates"] is discriminates and stored["kind"] == refutation.kind
    assert claims.record()["verdicts"][0]["discriminating"] is discriminates


def test_every_refutation_must_discriminate_and_the_line_says_which(capsys):
    claims = Claims("P", profile="cpu")
    v = claims.check(
        "EL2N half matches full data",
        -0.2,
        -1.0,
        compare=">=",
        kind="paper",
        unit="points",
        refute=[control("a random half", -0.88), rival("no pruning cost", 0.0, band=(-2, -1))],
    )
    assert v.holds and v.discriminating is False and v.status == "reproduced"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[✓] EL2N half matches full data: measured -0.2 points")
    assert out[1] == (
        "    refuted by: control a random half: measured -0.88 points -> does NOT discriminate; "
        "rival no pruning cost: 0.0 points against the band [-2, -1] points -> discriminates"
    )
    line = format_table([claims.record()]).splitlines()
    assert "NO" in line[2] and "1 report-only" not in line[-1]
    assert "0 of 1 discriminating" in line[-1]


def test_a_paper_claim_must_say_what_would_refute_it():
    claims = Claims("P", profile="ci", verbose=False)
    with pytest.raises(ValueError, match="what would have refuted it"):
        claims.check("no control", 1.0, 1.0, kind="paper")
    with pytest.raises(ValueError, match="made by gc.claims.control"):
        claims.check("not a refutation", 1.0, 1.0, kind="paper", refute=[("control", 0.0)])
    with pytest.raises(ValueError, match="for paper claims"):
        claims.check("identity", 0.0, 0.0, kind="sanity", refute=REFUTE)
    with pytest.raises(ValueError, match="source must be one of"):
        claims.check("x", 1.0, 1.0, kind="paper", refute=REFUTE, source="folklore")
    sanity = claims.check("identity", 0.0, 0.0, kind="sanity")
    assert sanity.discriminating is None and sanity.refutation_text == ""
    assert claims.record()["verdicts"][-1]["discriminating"] is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: control("", 1.0),
        lambda: control(None, 1.0),
        lambda: rival("r", 0.0, band=(1.0,)),
        lambda: bound("b", 1.5, near=0.5),
        lambda: bound("b", 1.5, near="close"),
    ],
)
def test_bad_refutations_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_the_source_of_the_expected_value_is_shown():
    claims = Claims("P", profile="ci", verbose=False)
    paper = claims.check("a", 0.98, 1.0, rtol=0.05, kind="paper", refute=REFUTE, source="paper")
    ours = claims.check("b", 0.98, 1.0, rtol=0.05, kind="paper", refute=REFUTE)
    assert paper.expected_text == "≈ 1 (±5%) (paper)" and ours.expected_text == "≈ 1 (±5%)"
    assert ours.source == "ours"
