"""The audit summary template: its plain-text and Telegram-HTML variants."""

from __future__ import annotations

from agent.service.runs import RunService
from agent.views.summary import render_summary, summary_of


async def test_the_html_variant_escapes_everything_but_its_own_tags(service: RunService) -> None:
    await service.start("h1", "incident: API latency spike <script>alert(1)</script> & more")
    summary = summary_of(await service.run_tree("h1"))
    html = render_summary(summary, html=True)
    text = render_summary(summary)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert "<b>Run h1: WAITING_APPROVAL</b>" in html
    assert "<code>api-latency-spike</code>" in html
    assert "<script>alert(1)</script> & more" in text and "<b>" not in text
