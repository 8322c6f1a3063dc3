"""The report renderers on a hand-built result: table formatting, escaping, self-containment, skips."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunesmith.eval.html import render_html
from tunesmith.eval.report import summary_text, write_reports
from tunesmith.eval.table import fmt, fmt_diff, metric_rows, render_markdown


def result(with_base: bool = True) -> dict[str, Any]:
    """A result as evaluate() returns it, with text that needs escaping."""
    out: dict[str, Any] = {
        "model": {"loss": 1.25, "exact_match": 0.5, "repetition_rate": 0.25, "uppercase_share": 0.9},
        "reference": {"uppercase_share": 1.0},
        "skipped": {"label_accuracy": "the references are free text, not a small label set"},
        "samples": {"loss": 10, "prompts": 2}, "data": "held/out.jsonl", "report": None,
        "examples": [
            {"source": "held/out.jsonl:1", "prompt": [{"role": "user", "content": "say <b>hi</b> & bye"}],
             "reference": "HI", "reply": "Hi!", "base_reply": "<script>alert(1)</script>"},
            {"source": "held/out.jsonl:2", "prompt": [{"role": "system", "content": "Shout."},
                                                      {"role": "user", "content": "see https://example.com"}],
             "reference": "OK", "reply": "", "base_reply": "ok then"},
        ],
    }
    if with_base:
        out["base"] = {"loss": 2.0, "exact_match": 0.0, "repetition_rate": 0.1, "uppercase_share": 0.1}
        out["difference"] = {k: out["model"][k] - out["base"][k] for k in out["base"]}
    else:
        for ex in out["examples"]:
            del ex["base_reply"]
    return out


def test_formatting_of_values_and_differences() -> None:
    assert fmt(0.5, "share") == "50.0%" and fmt(1.23456, "num") == "1.235" and fmt(123.45, "num") == "123.5"
    assert fmt(None, "num") == "–" and fmt(float("inf"), "num") == "inf"
    assert fmt_diff(0.125, "share") == "+12.5 pp" and fmt_diff(-0.75, "num") == "-0.750"
    assert fmt(6.0, "count") == "6.0" and fmt_diff(-2.5, "count") == "-2.5"  # lengths: one decimal


def test_rows_say_which_way_is_better() -> None:
    rows = {r["key"]: r for r in metric_rows(result())}
    assert list(rows) == ["loss", "exact_match", "repetition_rate", "uppercase_share"]  # table order, present only
    assert rows["loss"]["good"] is True  # loss went down
    assert rows["exact_match"]["good"] is True
    assert rows["repetition_rate"]["good"] is False  # more repetition is worse
    assert rows["uppercase_share"]["good"] is None  # depends on the task
    assert rows["uppercase_share"]["reference"] == "100.0%"


def test_html_escapes_text_and_fetches_nothing() -> None:
    html = render_html(result(), ("tuned", "base"), None)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "https://example.com" in html  # user text stays visible, as text
    assert 'class="delta good"' in html and 'class="delta bad"' in html
    assert "skipped label accuracy: the references are free text" in html
    assert html.count("exact match</span>") == 1  # "Hi!" matches "HI" once normalised
    assert "(empty reply)" in html and "prompt · system" in html


def test_without_base_there_is_one_reply_column() -> None:
    html = render_html(result(with_base=False), ("model", None), None)
    assert html.count('class="reply') == 2 and "change" not in html
    md = render_markdown(result(with_base=False), ("model", None), None)
    assert "| metric | model | reference |" in md


def test_write_reports_embeds_the_loss_curve(tmp_path: Path) -> None:
    curve = tmp_path / "loss.png"
    curve.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    paths = write_reports(result(), tmp_path / "out" / "report.html", curve, ("tuned", "base"))
    html = Path(paths["html"]).read_text(encoding="utf-8")
    assert paths["md"] == str(tmp_path / "out" / "report.md")
    assert "data:image/png;base64,iVBORw0KGgpmYWtl" in html
    md = Path(paths["md"]).read_text(encoding="utf-8")
    assert "| loss on reply tokens | 2.000 | 1.250 | -0.750 |  |" in md
    assert "![training loss curve](../loss.png)" in md  # linked relative to report.md
    assert "> <script>alert(1)</script>" in md and "> (empty reply)" in md


def test_summary_text_is_an_aligned_table() -> None:
    text = summary_text(result(), ("tuned", "base"))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "change", "reference"]
    assert len({len(line) for line in lines[:6]}) == 1  # header, rule and rows align
    assert "exact match" in text and "+50.0 pp" in text
    assert lines[-1].startswith("skipped label accuracy:")
