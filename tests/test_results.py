"""Recorded results: recording a run, the closing verdict table, the course scorecard and the
comparison of a fresh run with the recorded one (on records written here)."""

from __future__ import annotations

import json

import nbformat
import pytest

from gradcourse import results
from gradcourse.claims import ClaimFailed, Claims, rival

# what would refute the test claims: a rival value outside its band (discriminating)
REFUTE = rival("no effect", 0.0, band=(1.0, 2.0))


def run(profile, out_dir, measured=(1.0, 0.4, 0.0), finish=True):
    """A small notebook's claims: a paper claim required everywhere, one required only at gpu,
    and a sanity check."""
    claims = Claims("P", notebook="nb", profile=profile, out_dir=out_dir, verbose=False)
    claims.check(
        "required",
        measured[0],
        1.0,
        rtol=0.1,
        kind="paper",
        refute=REFUTE,
        paper_value="1 (Fig. 2)",
    )
    claims.check(
        "gpu only", measured[1], 1.0, rtol=0.1, kind="paper", refute=REFUTE, holds_at=("gpu",)
    )
    claims.check("identity", measured[2], 0.0, tol=1e-9, kind="sanity")
    if finish:
        claims.report()
    return claims


def test_record_load_and_machine(tmp_path):
    claims = run("ci", tmp_path / "build")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("a"),
            nbformat.v4.new_markdown_cell("## Section one\ntext"),
            nbformat.v4.new_code_cell("b"),
            nbformat.v4.new_code_cell("c"),
        ]
    )
    stamps = [("00:00:00", "00:00:01.5"), ("00:00:02", "00:00:04"), ("00:00:05", "00:00:05.25")]
    for cell, (start, end) in zip([nb.cells[0], nb.cells[2], nb.cells[3]], stamps, strict=True):
        cell.metadata["execution"] = {
            "iopub.execute_input": f"2026-11-30T{start}Z",
            "shell.execute_reply": f"2026-11-30T{end}Z",
        }
    path = results.record_run(
        claims.record(), notebook="nb", profile="ci", seconds=12.34, executed=nb,
        root=tmp_path / "results",
    )  # fmt: skip
    assert path == tmp_path / "results" / "ci" / "nb.json"
    rec = results.load("ci", "nb", tmp_path / "results")
    assert rec["wall_seconds"] == 12.3 and rec["finished"] and rec["error"] is None
    assert rec["sections"] == [
        {"section": "setup", "seconds": 1.5},
        {"section": "Section one", "seconds": 2.25},
    ]
    assert {"cpu", "cores", "torch_threads", "cpu_capability", "gpu"} <= set(rec["machine"])
    assert {"python", "torch", "numpy", "gradcourse"} <= set(rec["versions"])
    assert [v["name"] for v in rec["verdicts"]] == ["required", "gpu only", "identity"]
    assert results.load("gpu", "nb", tmp_path / "results") is None


def test_a_notebook_without_a_record_is_recorded_as_unfinished(tmp_path):
    path = results.record_run(
        None, notebook="nb", profile="cpu", seconds=3.0, error="boom", root=tmp_path
    )
    rec = json.loads(path.read_text())
    assert rec["verdicts"] == [] and rec["finished"] is False and rec["error"] == "boom"


def test_verdict_table_shows_this_run_and_every_profile(tmp_path):
    root = tmp_path / "results"
    for profile, measured in (("ci", (1.0, 0.4, 0.0)), ("cpu", (1.02, 0.95, 0.0))):
        results.record_run(
            run(profile, tmp_path / profile, measured=measured).record(),
            notebook="nb", profile=profile, seconds=1.0, root=root,
        )  # fmt: skip
    current = run("ci", tmp_path / "now", measured=(0.98, 0.5, 0.0))
    table = results.verdict_table("nb", current, root=root)
    assert table.header == [
        "claim", "kind", "paper", "expected", "refuted by", "this run", "ci", "cpu", "gpu"
    ]  # fmt: skip
    required, gpu_only, identity = table.rows
    assert required[:4] == ["required", "paper", "1 (Fig. 2)", "≈ 1 (±10%)"]
    assert required[4] == "rival no effect: 0.0 against the band [1, 2] -> discriminates"
    assert required[5:] == ["0.98 **✓**", "1 **✓**", "1.02 **✓**", "not run"]
    assert gpu_only[5:] == ["0.5 ○", "0.4 ○", "0.95 ✓", "not run"]
    assert identity[1] == "sanity" and identity[4] == "" and identity[5] == "0.0 **✓**"
    markdown = table._repr_markdown_()
    assert markdown.startswith("| claim | kind | paper |") and "gpu: not run yet" in markdown
    # a claim only some runs have: "—" where a recorded run did not check it
    extra = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / "x", verbose=False)
    extra.check("new claim", 1.0, 1.0, kind="paper", refute=REFUTE)
    rows = results.verdict_table("nb", extra, root=root).rows
    assert rows[0][0] == "new claim" and rows[0][6:] == ["—", "—", "not run"]


def test_scorecard_counts_paper_claims_per_profile_and_fills_the_readme(tmp_path):
    root = tmp_path / "results"
    results.record_run(
        run("cpu", tmp_path / "b").record(), notebook="nb", profile="cpu", seconds=1, root=root
    )
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / "c", verbose=False)
    with pytest.raises(ClaimFailed):
        claims.check("required", 0.0, 1.0, rtol=0.1, kind="paper", refute=REFUTE)
    results.record_run(claims.record(), notebook="nb", profile="ci", seconds=1, root=root)
    table = results.scorecard(root)
    row = next(line for line in table.splitlines() if line.startswith("| `nb`"))
    assert row == (
        "| `nb` | 0/1 required, 0/0 other; discriminating 1/1; sanity 0/0 (unfinished) "
        "| 1/1 required, 0/1 other; discriminating 2/2; sanity 1/1 | not run |"
    )
    readme = f"intro\n{results.SCORECARD_START}\nold\n{results.SCORECARD_END}\nrest\n"
    updated = results.replace_scorecard(readme, table)
    assert updated == f"intro\n{results.SCORECARD_START}\n{table}\n{results.SCORECARD_END}\nrest\n"
    assert results.replace_scorecard(updated, table) == updated
    with pytest.raises(ValueError, match="scorecard"):
        results.replace_scorecard("no markers", table)


def test_compare_finds_what_changed(tmp_path):
    recorded = run("ci", tmp_path / "a").record()
    same = run("ci", tmp_path / "b", measured=(1.0 + 1e-9, 0.4, 1e-12)).record()
    assert results.compare(same, recorded, rtol=1e-6, atol=1e-9) == []
    drifted = run("ci", tmp_path / "c", measured=(1.05, 0.4, 0.0)).record()
    (problem,) = results.compare(drifted, recorded, rtol=1e-3, atol=1e-9)
    assert "'required': measured 1.05 now, 1 recorded" in problem
    assert results.compare(drifted, recorded, rtol=0.1, atol=0) == []  # within a stated tolerance
    flipped = run("ci", tmp_path / "d", measured=(1.0, 0.95, 0.0)).record()
    problems = results.compare(flipped, recorded, rtol=1, atol=1)
    assert problems == [
        "nb: 'gpu only': status 'reproduced' now, 'not reproduced at this scale' recorded"
    ]
    unfinished = run("ci", tmp_path / "e", finish=False).record()
    assert results.compare(unfinished, recorded, rtol=0, atol=0) == [
        "nb: the fresh run did not finish"
    ]
    renamed = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / "f", verbose=False)
    renamed.check("other", 1.0, 1.0, kind="paper", refute=REFUTE)
    (problem,) = results.compare(renamed.record(), recorded, rtol=1, atol=1)
    assert "the claims differ" in problem


def test_compare_allows_measured_expectations_and_equal_infinities(tmp_path):
    def record(expected, measured, out):
        claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / out, verbose=False)
        claims.check(
            "vs a measured bound", measured, expected, compare="<=", kind="paper", refute=REFUTE
        )
        claims.report()
        return claims.record()

    recorded = record(0.041381563974662944, 0.01, "a")
    fresh = record(0.04138156401604451, 0.01, "b")  # the bound moved at rounding level
    assert results.compare(fresh, recorded, rtol=1e-6, atol=0) == []
    moved = record(0.05, 0.01, "c")
    (problem,) = results.compare(moved, recorded, rtol=1e-6, atol=0)
    assert "expected 0.05 now" in problem
    inf = record(float("inf"), 0.01, "d")
    assert results.compare(inf, record(float("inf"), 0.01, "e"), rtol=1e-6, atol=0) == []


def test_a_broken_results_file_is_named(tmp_path):
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "nb.json").write_text("<<<<<<< HEAD\n{")
    with pytest.raises(ValueError, match=r"nb.json is not a results record .*--record"):
        results.load("ci", "nb", tmp_path)


def test_compare_allows_a_claims_declared_spread_and_no_more(tmp_path):
    def record(measured, out, spread):
        claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / out, verbose=False)
        claims.check("edge of stability", measured, [0.9, 1.1], compare="in", kind="paper", refute=REFUTE,
                     spread=spread)  # fmt: skip
        claims.report()
        return claims.record()

    recorded = record(1.002, "a", 0.05)
    assert results.compare(record(0.982, "b", 0.05), recorded, rtol=1e-2, atol=0) == []
    (problem,) = results.compare(record(0.93, "c", 0.05), recorded, rtol=1e-2, atol=0)
    assert "beyond rtol 0.05" in problem
    plain = record(1.002, "d", 0.0)  # without a declared spread, the global tolerance holds
    assert len(results.compare(record(0.982, "e", 0.0), plain, rtol=1e-2, atol=0)) == 1
    with pytest.raises(ValueError, match="spread"):
        Claims("P", notebook="nb", profile="ci", write=False, verbose=False).check(
            "x", 1.0, 1.0, kind="paper", refute=REFUTE, spread=1.5
        )


def test_compare_checks_what_would_have_refuted_each_claim(tmp_path):
    from gradcourse.claims import control

    def record(value, out, label="a random half"):
        claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / out, verbose=False)
        claims.check(
            "matches full", -0.2, -0.5, compare=">=", kind="paper", refute=control(label, value)
        )
        claims.report()
        return claims.record()

    recorded = record(-0.9, "a")
    assert results.compare(record(-0.9 + 1e-9, "b"), recorded, rtol=1e-6, atol=1e-6) == []
    (moved,) = results.compare(record(-0.8, "c"), recorded, rtol=1e-3, atol=1e-6)
    assert "control 'a random half': value -0.8 now, -0.9 recorded" in moved
    # the control now passes the check too: the claim stopped discriminating
    flipped = results.compare(record(-0.3, "d"), recorded, rtol=1, atol=1)
    assert flipped == ["nb: 'matches full': discriminating False now, True recorded"]
    (renamed,) = results.compare(record(-0.9, "e", "an untrained net"), recorded, rtol=1, atol=1)
    assert "refuted by ['an untrained net'] now, ['a random half'] recorded" in renamed


def test_verdict_table_marks_a_claim_that_does_not_discriminate(tmp_path):
    from gradcourse.claims import control

    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    claims.check("weak", -0.2, -1.0, compare=">=", kind="paper", refute=control("random", -0.8))
    row = results.verdict_table("nb", claims, root=tmp_path / "none").rows[0]
    assert row[4] == "control random: measured -0.8 -> does NOT discriminate"
    assert row[5] == "-0.2 **✓†**"


def test_compare_an_infinity_is_close_only_to_itself(tmp_path):
    assert not results._close(float("inf"), 1.0, 1e-3, 1e-6)
    assert not results._close(1.0, float("-inf"), 1e-3, 1e-6)
    assert not results._close(float("-inf"), float("inf"), 1e-3, 1e-6)
    assert results._close(float("inf"), float("inf"), 0, 0)
    assert results._close([1.0, float("-inf")], [1.0 + 1e-9, float("-inf")], 1e-6, 0)


def test_verdict_table_takes_a_record_whose_machine_is_null(tmp_path):
    root = tmp_path / "results"
    path = results.record_run(
        run("ci", tmp_path / "a").record(), notebook="nb", profile="ci", seconds=1, root=root
    )
    record = json.loads(path.read_text())
    record["machine"] = None
    path.write_text(json.dumps(record))
    footer = results.verdict_table("nb", root=root).footer
    assert any(line.startswith("ci: ") and "? thread(s)" in line for line in footer)


def test_verdict_table_names_the_claims_this_run_no_longer_checks(tmp_path):
    root = tmp_path / "results"
    results.record_run(
        run("ci", tmp_path / "a").record(), notebook="nb", profile="ci", seconds=1, root=root
    )
    now = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path / "b", verbose=False)
    now.check("required", 1.0, 1.0, rtol=0.1, kind="paper", refute=REFUTE)
    names = [row[0] for row in results.verdict_table("nb", now, root=root).rows]
    assert names == [
        "required",
        "gpu only (not checked by this run)",
        "identity (not checked by this run)",
    ]


def test_verdict_tables_show_three_significant_digits_and_the_paper_value_as_given(tmp_path):
    from gradcourse.claims import control

    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    v = claims.check(
        "precise", 0.123456, [0.05, 0.25], compare="in", kind="paper", paper_value=70.28,
        unit="ratio", refute=control("random", 0.98765),
    )  # fmt: skip
    assert v.measured_text == "0.1235 ratio"  # printed verdicts keep four
    row = results.verdict_table("nb", claims, root=tmp_path / "none").rows[0]
    assert row[2] == "70.28"  # the paper's own number, not rounded
    assert row[4] == "control random: measured 0.988 ratio -> discriminates"
    assert row[5] == "0.123 ratio **✓**"


def test_claim_names_show_their_test_below_in_tables_and_stay_plain_in_print(tmp_path):
    assert results.split_claim_name("P: a beats b (lower end > 0)") == (
        "P: a beats b",
        "lower end > 0",
    )
    assert results.split_claim_name("sharpness / (2/η), η=0.05") == (
        "sharpness / (2/η), η=0.05",
        "",
    )
    assert results.split_claim_name("f(x) (a (nested) test)") == ("f(x)", "a (nested) test")
    assert results.split_claim_name("g(x)") == ("g(x)", "")
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    claims.check("a < b (upper end < 0)", -1.0, 0.0, compare="<", kind="paper", refute=REFUTE)
    table = results.verdict_table("nb", claims, root=tmp_path / "none")
    assert "| a &lt; b<br><small>upper end &lt; 0</small> |" in table._repr_markdown_()
    assert "| a < b (upper end < 0) |" in str(table) and "<br>" not in str(table)


def test_compare_across_cpu_makers_allows_the_measured_rounding_and_no_verdict_change(tmp_path):
    """MKL rounds differently on Intel and AMD processors: across makers the numbers may differ
    within CROSS_MAKER_RTOL, the verdicts may not; on the same maker the stated rtol holds."""
    intel, amd = {"cpu": "Intel(R) Xeon(R) Processor"}, {"cpu": "AMD EPYC 9B14"}
    assert (results.cpu_maker(intel["cpu"]), results.cpu_maker(amd["cpu"])) == ("intel", "amd")
    assert results.cpu_maker("Apple M2") == results.cpu_maker(None) == "other"
    recorded = {**run("ci", tmp_path / "a").record(), "machine": amd}
    drifted = run("ci", tmp_path / "b", measured=(1.0, 0.6, 0.0)).record()  # 0.33 relative
    assert results.compare(drifted, recorded, rtol=1e-2, atol=0, fresh_machine=intel) == []
    (problem,) = results.compare(drifted, recorded, rtol=1e-2, atol=0, fresh_machine=amd)
    assert "beyond rtol 0.01" in problem
    # the fresh machine unknown: compared as on the same maker
    assert len(results.compare(drifted, recorded, rtol=1e-2, atol=0)) == 1
    far = run("ci", tmp_path / "c", measured=(1.0, 2.0, 0.0)).record()  # 0.8 relative
    (problem,) = results.compare(far, recorded, rtol=1e-2, atol=0, fresh_machine=intel)
    assert f"beyond rtol {results.CROSS_MAKER_RTOL:g}" in problem
    flipped = run("ci", tmp_path / "d", measured=(1.0, 0.95, 0.0)).record()
    problems = results.compare(flipped, recorded, rtol=1e-2, atol=0, fresh_machine=intel)
    assert any("status 'reproduced' now" in p for p in problems)
