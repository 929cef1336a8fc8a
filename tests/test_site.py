"""The site builder's own logic, without Sphinx: which executed copies are current, and how an
interactive panel is frozen to what it showed last."""

from __future__ import annotations

import nbformat

from gradcourse import runner, site
from gradcourse.claims import rival

# what would refute the test claims: a rival value outside its band (discriminating)
REFUTE = rival("no effect", 0.0, band=(1.0, 2.0))

VIEW = site.WIDGET_VIEW
STATE = site.WIDGET_STATE


def panel_notebook():
    """A notebook whose cell shows a VBox(HTML title, HBox(slider), Output(figure + text))."""
    figure = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo="}}
    text = {"output_type": "stream", "name": "stdout", "text": "k = 3\n"}
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_title", "IPY_MODEL_row", "IPY_MODEL_out"]}},
        "title": {"model_name": "HTMLModel", "state": {"value": "<b>panel</b>"}},
        "row": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_slider"]}},
        "slider": {"model_name": "IntSliderModel", "state": {"value": 3}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [figure, text]}},
    }  # fmt: skip
    nb = nbformat.v4.new_notebook()
    view = {"output_type": "display_data", "metadata": {},
            "data": {VIEW: {"model_id": "box", "version_major": 2}, "text/plain": "VBox(...)"}}  # fmt: skip
    plain = {"output_type": "stream", "name": "stdout", "text": "before\n"}
    nb.cells = [
        nbformat.v4.new_code_cell("explore(...)", outputs=[nbformat.from_dict(plain), nbformat.from_dict(view)]),
        nbformat.v4.new_markdown_cell("text"),
    ]  # fmt: skip
    nb.metadata["widgets"] = {STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb, figure, text


def test_freeze_widgets_shows_the_panels_last_output():
    nb, figure, text = panel_notebook()
    assert site.freeze_widgets(nb) == 1
    outputs = nb.cells[0].outputs
    assert outputs[0]["text"] == "before\n"  # other outputs stay, in order
    assert "gc-static-note" in outputs[1]["data"]["text/html"]
    assert outputs[2] == figure and outputs[3] == text
    assert "widgets" not in nb.metadata
    nbformat.validate(nb)  # still a valid notebook for the site builder


def test_a_view_without_stored_state_becomes_the_note_alone():
    nb, _, _ = panel_notebook()
    nb.metadata.pop("widgets")
    site.freeze_widgets(nb)
    assert len(nb.cells[0].outputs) == 2 and "gc-static-note" in str(nb.cells[0].outputs[1])


def test_widget_outputs_follow_children_once_in_panel_order():
    models = {
        "a": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_o1", "IPY_MODEL_b"]}},
        "b": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_o2", "IPY_MODEL_a"]}},
        "o1": {"model_name": "OutputModel", "state": {"outputs": [{"n": 1}]}},
        "o2": {"model_name": "OutputModel", "state": {"outputs": [{"n": 2}]}},
    }
    assert site.widget_outputs("a", models) == [{"n": 1}, {"n": 2}]  # the cycle a-b-a ends
    assert site.widget_outputs("missing", models) == []


def test_an_executed_copy_is_current_only_for_its_source_profile_and_success(tmp_path):
    source = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), source)
    executed = tmp_path / "out" / "nb.ipynb"
    assert not site.is_current(source, executed, "ci")
    executed.parent.mkdir()
    done = nbformat.read(source, as_version=4)
    done.metadata["gradcourse"] = {
        "profile": "ci", "source_sha256": runner.source_digest(source), "error": None
    }  # fmt: skip
    nbformat.write(done, executed)
    assert site.is_current(source, executed, "ci")
    assert not site.is_current(source, executed, "cpu")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("2")]), source)
    assert not site.is_current(source, executed, "ci")  # the source changed since
    done.metadata["gradcourse"].update(source_sha256=runner.source_digest(source), error="boom")
    nbformat.write(done, executed)
    assert not site.is_current(source, executed, "ci")  # a failed run is re-executed
    executed.write_text("not a notebook")
    assert not site.is_current(source, executed, "ci")


def test_verdict_tables_are_rendered_again_from_the_run_and_current_results(tmp_path, monkeypatch):
    from gradcourse import results
    from gradcourse.claims import Claims

    monkeypatch.setenv("GRADCOURSE_RESULTS", str(tmp_path / "results"))
    claims = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    claims.check("c", 1.0, 1.0, kind="paper", refute=REFUTE)
    claims.report()
    results.record_run(claims.record(), notebook="nb", profile="cpu", seconds=1.0)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell('gc.results.verdict_table("nb", claims)')]
    )
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="stale\n")]
    assert site.refresh_verdict_tables(nb, "nb", claims.record()) == 1
    (out,) = nb.cells[0].outputs
    markdown = out["data"]["text/markdown"]
    assert "| c | paper |" in markdown and "| 1 **✓** | not run | 1 **✓** | not run |" in markdown


def test_the_digest_follows_the_library_too(tmp_path, monkeypatch):
    source = tmp_path / "nb.ipynb"
    source.write_text("{}")
    first = runner.source_digest(source)
    assert runner.source_digest(source) == first
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "runner.py").write_text("# a library")
    monkeypatch.setattr(runner, "__file__", str(fake / "runner.py"))
    assert runner.source_digest(source) != first


def test_write_notebook_writes_what_nbformat_writes_atomically(tmp_path):
    import os

    nb, _, _ = panel_notebook()
    nbformat.write(nb, tmp_path / "plain.ipynb")
    old = os.umask(0o027)
    try:
        site.write_notebook(nb, tmp_path / "atomic.ipynb")
    finally:
        os.umask(old)
    assert (tmp_path / "atomic.ipynb").read_bytes() == (tmp_path / "plain.ipynb").read_bytes()
    assert os.stat(tmp_path / "atomic.ipynb").st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.ipynb", "plain.ipynb"]


def test_the_api_reference_covers_every_listed_module_and_they_import():
    import importlib

    page = site._api_page()
    for name in site.API_MODULES:
        importlib.import_module(f"gradcourse.{name}")
        assert f".. automodule:: gradcourse.{name}\n   :members:" in page


def test_the_generated_conf_shows_docstrings_as_written():
    namespace: dict = {}
    exec(site.CONF, namespace)
    assert "sphinx.ext.autodoc" in namespace["extensions"]
    lines = ["Sum of |g_i|:", "", "    an example", "end"]
    namespace["_as_written"](None, "function", "f", None, {}, lines)
    assert lines == ["::", "", "    Sum of |g_i|:", "", "        an example", "    end", ""]
    empty: list[str] = []
    namespace["_as_written"](None, "function", "f", None, {}, empty)
    assert empty == []


def test_the_front_page_carries_the_readmes_course_map_and_links_the_api():
    readme = "# t\n\nintro\n\n## Course map\n\nRead 00 first.\n\n| a |\n\n## Scorecard\n\nx\n"
    assert site._readme_section(readme, "Course map") == "Read 00 first.\n\n| a |"
    assert site._readme_section(readme, "Nothing") == ""
    page = site._front_page([("00_tour", "00 · Tour")], "| scorecard |", "ci")
    assert "## Course map" in page and "Read 00 first" in page  # from the repository's README
    assert "(api.md)" in page and page.rstrip().endswith("00_tour\napi\n```")


def test_solution_cells_are_folded_on_the_site_and_nothing_else():
    nb = nbformat.v4.new_notebook()
    solution = nbformat.v4.new_code_cell(
        "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
    )
    solution.metadata["nbgrader"] = {
        "solution": True,
        "grade": False,
        "grade_id": "f",
        "locked": False,
    }
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), solution]
    assert site.fold_solutions(nb) == 1 and site.fold_solutions(nb) == 1
    assert nb.cells[1].metadata["tags"] == ["hide-input"]
    assert "tags" not in nb.cells[0].metadata
