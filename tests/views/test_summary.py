"""The audit summary template: its plain-text and Telegram-HTML variants."""

from __future__ import annotations

import dataclasses

from agent.records import Decision
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


async def test_the_summary_ends_with_a_timeline_of_decisions_and_the_waits_they_caused(
    service: RunService,
) -> None:
    """Start, each decision with who made it and how long the run waited for it, and the
    end with the share of the time spent waiting for people."""
    await service.start("t1", "incident: API latency spike")
    await service.decide("t1", Decision.APPROVE, "cli:oncall")
    tree = await service.run_tree("t1")
    # The moments as a 3 a.m. incident has them: asked at 05:00:10, approved 4 min later.
    t0 = 1_700_000_000.0 - 1_700_000_000.0 % 86400 + 5 * 3600
    run = dataclasses.replace(tree.root, created_at=t0, finished_at=t0 + 300)
    [approval] = tree.approvals
    approval = dataclasses.replace(approval, created_at=t0 + 10, decided_at=t0 + 250)
    summary = summary_of(dataclasses.replace(tree, runs=(run,), approvals=(approval,)))
    assert summary.timeline == [
        "05:00:00  started by cli:tester",
        "05:04:10  #1 scale-out: approved by cli:oncall after 4 min 0 s",
        f"05:05:00  {run.status} (5 min 0 s in all, 4 min 0 s of it waiting for people)",
    ]
    text = render_summary(summary)
    assert "Timeline (UTC):\n  05:00:00  started by cli:tester\n" in text
    assert text.rstrip().splitlines()[-1].startswith("audit: ")  # the head stays last


async def test_a_runs_error_is_left_out_only_where_it_repeats_a_tools_own_words(
    service: RunService,
) -> None:
    """A run's error that quotes a failed call's error after a short lead-in is listed once;
    one that only shares a short word with it ("failed") or says more is listed too."""
    await service.start("e1", "incident: API latency spike")
    tree = await service.run_tree("e1", calls=True)
    call = tree.calls[-1]

    def errors(said: str, run_error: str) -> list[str]:
        failed = dataclasses.replace(call, status="error", outcome={"error": said})
        run = dataclasses.replace(tree.root, error=run_error)
        return summary_of(dataclasses.replace(tree, runs=(run,), calls=(failed,))).errors

    words = "MCP server ops: Error executing tool refuse"
    assert len(errors(words, f"step 'ask' failed: {words}")) == 1
    assert len(errors(words, f"Calls a tool that refuses: step ask failed ({words})")) == 1
    # The tool's own words may end as the run's do: a sentence, a parenthesis.
    for said in (f"{words}.", "unknown MCP tool 'ops.refuse' (servers: ops)"):
        assert len(errors(said, f"Calls a tool that refuses: step ask failed ({said})")) == 1
    assert len(errors("failed", "disk full on db-1; the step failed")) == 2
    assert len(errors(words, f"{'the model also saw the disk fill up on db-1; ' * 3}{words}")) == 2
    assert len(errors(words, f"{words}; and the rollback did not run")) == 2
