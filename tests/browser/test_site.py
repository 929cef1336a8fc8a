"""The course site (`make site`), built from a `ci` run, opened in headless Chromium: every
notebook page loads and shows its figures (rendered, non-zero size) and its verdict table, the
front page shows the course map and the scorecard, the exercises' solutions are folded, formulas are
typeset offline, the API reference documents the library, and no internal link is broken."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from .conftest import ROOT, SCREENSHOTS

NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import os

    from gradcourse.site import build

    build_dir = tmp_path_factory.mktemp("site-build")
    os.environ.setdefault("GRADCOURSE_DATA", str(ROOT / "data"))  # reuse the nbval run's cache
    start = time.monotonic()
    out, failed = build("ci", build_dir, quiet=True)
    print(f"\nsite built from a ci run in {time.monotonic() - start:.0f} s: {out}")
    assert not failed, f"notebooks failed to execute for the site: {failed}"
    return out


def internal_links(page) -> list[str]:
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    return [h for h in hrefs if h.startswith("file://")]


def test_site_pages_figures_tables_and_links(browser, site):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    index = site / "index.html"
    page.goto(index.as_uri())
    assert page.locator("h1").first.inner_text().strip().startswith("gradcourse")
    scorecard = page.locator("section#scorecard table")
    assert scorecard.count() == 1 and "notebook" in scorecard.inner_text()
    course_map = page.locator("section#course-map table")
    assert course_map.count() == 1 and "00_tour" in course_map.inner_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "site_index.png"), full_page=True)
    to_visit, seen, broken = [index.as_uri()], set(), []
    while to_visit:
        url = urldefrag(to_visit.pop())[0]
        if url in seen or not url.endswith(".html"):
            continue
        seen.add(url)
        page.goto(url)
        for link in internal_links(page):
            target = Path(unquote(urlparse(urldefrag(link)[0]).path))
            if not target.exists():
                broken.append(f"{url} -> {link}")
            elif target.suffix == ".html" and target.is_relative_to(site):
                to_visit.append(target.as_uri())
    assert not broken, "broken internal links:\n" + "\n".join(broken)
    api = site / "api.html"
    assert api.as_uri() in seen, "the API reference is not reachable from the front page"
    page.goto(api.as_uri())
    for name in ("per_example_grad_norms", "lanczos", "empirical_ntk", "check"):
        assert page.locator(f"dt[id$='.{name}']").count() >= 1, f"API reference: no {name}"
    for stem in NOTEBOOKS:
        path = site / f"{stem}.html"
        assert path.as_uri() in seen, f"{stem}: no page reachable from the front page"
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all(
            "article img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
        )
        assert sizes, f"{stem}: no figure on its page"
        assert all(w > 0 and h > 0 for w, h in sizes), f"{stem}: a figure did not render: {sizes}"
        table = page.locator("section#verdicts table")
        assert table.count() >= 1, f"{stem}: no verdict table"
        header = table.first.locator("th").all_inner_texts()
        assert header[:6] == ["claim", "kind", "paper", "expected", "refuted by", "this run"], (
            header
        )
        # the site's style: the table keeps readable columns and scrolls sideways
        assert table.first.evaluate("t => getComputedStyle(t).minWidth") != "0px", stem
        assert page.locator(".gc-static-note").count() >= 1, f"{stem}: its panel is not shown"
        if "$" in (ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"):
            # its formulas typeset by the MathJax the site bundles (no network needed)
            page.wait_for_function("document.querySelectorAll('mjx-container').length > 0")
        folded = page.locator("details.above-input")  # the exercises' solutions, folded
        assert folded.count() >= 2, f"{stem}: its exercises' solutions are not folded"
        assert not any(folded.evaluate_all("els => els.map(e => e.open)")), stem
        table.first.screenshot(path=str(SCREENSHOTS / f"site_{stem}_verdicts.png"))
    context.close()
