"""`pluribus view`'s page in a real browser (headless Chromium over the DevTools protocol): it renders, the problem
search finds a problem, a debate opens round by round, process steps and curves are drawn, no script error.

`make test-view` installs Chromium where it is missing and runs this file with PLURIBUS_REQUIRE_BROWSER=1 (a
missing browser then fails instead of skipping). Set PLURIBUS_VIEW_SCREENSHOT=FILE to keep the debate screenshot.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pluribus.view import write_view
from tests.cdp import Browser, browser_available
from tests.view_run import KNOWN, make_view_run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.browser

missing = browser_available()
if missing and not os.environ.get("PLURIBUS_REQUIRE_BROWSER"):
    pytest.skip(missing, allow_module_level=True)


def _non_blank(png: bytes) -> int:
    """How many distinct colours the screenshot has (a blank or failed page has one or two)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (1280, 860)
    return len(image.getcolors(maxcolors=1 << 20) or [])


def test_the_page_renders_searches_and_opens_a_debate(tmp_path: Path) -> None:
    run = make_view_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "pluribus.cli", "view", str(run)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with Browser() as b:
        b.open(run / "view.html")
        # the eval tab opens first, with its plot decoded from the inlined PNG
        assert b.wait("document.querySelector('section.on') && document.querySelector('section.on').id") == "eval"
        assert b.wait("document.querySelector('#eval img') && document.querySelector('#eval img').naturalWidth") > 500
        assert b.eval("document.querySelectorAll('#eval table').length") >= 2
        assert _non_blank(b.screenshot()) > 50

        b.click("nav button[data-tab=debates]")
        assert b.wait("document.querySelectorAll('#debatelist details.item').length") == 50  # one page of 120
        assert b.eval("document.querySelector('#debatelist .count').textContent") == "1\u201350 of 120"
        b.type("#debatelist input.search", KNOWN)
        b.wait(f"document.querySelector('#debatelist details.item').dataset.id === '{KNOWN}'")
        assert b.eval("[...document.querySelectorAll('#debatelist details.item')].map(d => d.dataset.id)") == [KNOWN]
        b.click("#debatelist details.item > summary")
        b.wait("!!document.querySelector('#debatelist details.item[open] table.debate')")
        rounds = b.eval("document.querySelectorAll('#debatelist table.debate tbody tr').length")
        agents = b.eval("[...document.querySelectorAll('#debatelist table.debate thead th')].map(t => t.textContent)")
        assert rounds == 2 and agents == ["", "solver", "checker", "skeptic"]
        assert "Final answer" in b.eval("document.querySelector('#debatelist .final').textContent")
        known = b.eval(f"D.stores[0].problems.find(p => p.id === '{KNOWN}')")
        moves = b.eval("[...document.querySelectorAll('#debatelist details.item[open] .move')].map(m => m.className)")
        assert sorted(m.split()[1] for m in moves) == ["broke", "fixed", "switched"]  # KNOWN's three moves
        final = b.eval("document.querySelector('#debatelist .final .chip').textContent")
        assert final.split(" ", 1)[1] == (known["final"] if known["final"] is not None else "unparsable")
        shot = b.screenshot()
        assert _non_blank(shot) > 50
        (tmp_path / "debate.png").write_bytes(shot)
        if os.environ.get("PLURIBUS_VIEW_SCREENSHOT"):
            Path(os.environ["PLURIBUS_VIEW_SCREENSHOT"]).write_bytes(shot)
        # a search that matches nothing says so
        b.eval("document.querySelector('#debatelist input.search').select()")
        b.send("Input.insertText", text="no such problem")
        assert b.wait("document.querySelector('#debatelist .count').textContent") == "none of 120 match"

        b.click("nav button[data-tab=process]")
        b.click("#plist details.item > summary")
        steps = b.wait("document.querySelectorAll('#plist details.item[open] .step').length")
        # each step's colour is its own Monte-Carlo score's (hue 0 red .. 120 green)
        hues = b.eval("[...document.querySelectorAll('#plist details.item[open] .step')].map(s => "
                      "+/hsl\\(([\\d.]+),/.exec(s.getAttribute('style'))[1])")
        first = b.eval("D.process[0].rows[0]")
        assert hues == pytest.approx([120 * x for x in first["scores"]]) and len(set(hues)) > 1
        assert steps == len(first["steps"]) >= 2
        assert "prm_scores" in b.eval("document.querySelector('#plist .step').textContent")
        metas = b.eval("[...document.querySelectorAll('#plist details.item[open] .step .meta')].map(m => m.textContent)")
        assert all("MC " in m for m in metas[:-1]), metas
        assert "answer right" in metas[-1] or "answer wrong" in metas[-1], metas  # graded, not rolled out

        b.click("nav button[data-tab=experts]")
        assert b.wait("document.querySelectorAll('#experts svg.chart polyline').length") >= 3
        b.click("nav button[data-tab=merges]")
        assert "task_arithmetic" in b.wait("document.querySelector('#merges pre') && document.querySelector('#merges pre').textContent")
        assert b.errors == []


def test_markup_in_questions_and_responses_is_shown_as_text_and_nan_curves_render(tmp_path: Path) -> None:
    """A question, an answer, an agent's name and a response that are HTML (an <img onerror>, "<!--<script>",
    "</script>") stay text: nothing of them runs or becomes an element; a loss that went nan still draws its curve."""
    from tests.view_run import HOSTILE, add_hostile

    run = make_view_run(tmp_path / "run", problems=3, eval_=False)
    add_hostile(run)
    page = write_view(run)
    with Browser() as b:
        b.open(page)
        b.click("nav button[data-tab=debates]")
        b.type("#debatelist input.search", "hostile-1")
        b.wait("document.querySelectorAll('#debatelist details.item').length === 1")
        b.click("#debatelist details.item > summary")
        b.wait("!!document.querySelector('#debatelist details.item[open] table.debate')")
        b.eval("document.querySelectorAll('#debatelist details.item[open] table.debate details').forEach(d => d.open = true)")
        assert b.eval("window.pwned === undefined") is True
        assert b.eval("document.querySelectorAll('main img, main b b, #debatelist script').length") == 0
        assert b.eval("document.querySelector('#debatelist details.item[open] .body > p').textContent") == \
            f"What is 3 + 4? {HOSTILE}"
        heads = b.eval("[...document.querySelectorAll('#debatelist table.debate thead th')].map(t => t.textContent)")
        assert heads == ["", "solver", "<b>checker</b>"]
        assert b.eval("document.querySelector('#debatelist table.debate pre').textContent").endswith(HOSTILE)
        assert '7"><b>x</b>' in b.eval("document.querySelector('#debatelist table.debate tbody tr:last-child').textContent")

        b.click("nav button[data-tab=experts]")
        card = "document.querySelector('#experts .expert[data-name=diverged]')"
        assert "2 nan/inf not drawn" in b.wait(f"{card} && {card}.textContent")
        assert b.eval(f"{card}.querySelectorAll('svg.chart').length") == 2
        assert b.errors == []
