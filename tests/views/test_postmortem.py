"""The post-mortem draft: the incident's facts from its journal (who, when, what each step
did, how long until mitigated and resolved) and empty sections for what people must write."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.records import Decision, RunRecord
from agent.service.alerts import AlertService
from agent.service.runs import RunService
from agent.settings import Settings
from agent.views.postmortem import NOT_MITIGATED, postmortem_of
from agent.views.units import duration
from tests.alert_harness import alert_settings, alertmanager_body
from tests.cli_helpers import Cli, assert_usage_error, make_cli_workspace
from tests.http_harness import served
from tests.support import LATENCY, allow, open_service, write_runbook

FAILING_RUNBOOK = """\
id: failing-fix
title: A fix that fails
description: One gated live step that prints and fails.
triggers: [failing fix]
approvers: [group:approvers]
steps:
  - id: fix
    title: Try the fix
    run: "{python} fail.py"
    approval: required
"""

FAIL_SCRIPT = """\
import sys
for n in range(8):
    print(f"out line {n}")
print("first | error", file=sys.stderr)
print("fatal: the fix did not take", file=sys.stderr)
sys.exit(3)
"""


def cells(row: str) -> list[str]:
    """A Markdown table row's cells."""
    return [cell.strip() for cell in row.strip().strip("|").split(" | ")]


async def finished(
    service: RunService, run_id: str, decide: Decision, note: str | None = None
) -> RunRecord:
    """Wait for the run's gate, decide it as oncall, then wait for its end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    decided = False
    while True:
        run = await service.get(run_id)
        if run.status.is_terminal:
            return run
        if not decided and await service.pending_approval(run_id) is not None:
            await service.decide(run_id, decide, "cli:oncall", note=note)
            decided = True
        assert loop.time() < deadline, f"run {run_id} did not end: {run.status}"
        await asyncio.sleep(0.02)


async def test_an_approved_incident_says_who_decided_what_each_step_did_and_how_long(
    service: RunService,
) -> None:
    await service.start(
        "inc", "incident: API latency spike service=checkout", role="supervisor", wait=False
    )
    run = await finished(service, "inc", Decision.APPROVE)
    draft = postmortem_of(await service.run_tree("inc", calls=False, events=True))

    assert draft.startswith("# Post-mortem draft: ")
    assert "- **Runbook:** `api-latency-spike` (" in draft and "service=checkout" in draft
    assert f"- **Outcome:** {run.status}" in draft
    assert "when step `scale-out` succeeded (a dry run: nothing was changed)" in draft
    assert "- **Time to resolve:** " in draft and "not resolved yet" not in draft
    assert "No alert: the run was started by a request (cli)." in draft
    timeline = [cells(line) for line in draft.splitlines() if line.startswith("| ")][1:]
    whats = [what for _, _, what in timeline]
    assert any(w.startswith("asked group:approvers to decide #1: step scale-out:") for w in whats)
    assert any(who == "cli:oncall" and "approved #1 after" in what for _, who, what in timeline)
    assert "step scale-out: ok (dry-run)" in whats
    assert whats[-1] == "run succeeded"
    for heading in ("## Timeline", "## Steps", "## Cause", "## Follow-ups"):
        assert heading in draft
    assert "### 4. `scale-out`: ok (1 attempt)" in draft


async def test_a_rejected_incident_is_not_mitigated_and_says_why(service: RunService) -> None:
    await service.start("rej", "incident: API latency spike", role="supervisor", wait=False)
    await finished(service, "rej", Decision.REJECT, note="not during the sale")
    draft = postmortem_of(await service.run_tree("rej", calls=False, events=True))
    assert f"- **Time to mitigate:** {NOT_MITIGATED}" in draft
    assert "- **Time to resolve:** not resolved yet" in draft
    assert "rejected #1 after" in draft and "not during the sale" in draft


async def test_a_failed_live_step_quotes_its_error_output_first(
    settings: Settings, workspace: Path
) -> None:
    write_runbook(workspace, "failing-fix", FAILING_RUNBOOK)
    (workspace / "fail.py").write_text(FAIL_SCRIPT)
    allow(workspace, "fail.py")
    async with open_service(settings.model_copy(update={"allow_shell": True})) as service:
        await service.start("fx", "failing-fix", role="runbook", wait=False)
        await finished(service, "fx", Decision.APPROVE)
        draft = postmortem_of(await service.run_tree("fx", calls=False, events=True))
    block = draft.split("### 1. `fix`: error", 1)[1].split("```")[1]
    assert block.strip().splitlines() == ["first | error", "fatal: the fix did not take"]
    assert "Result: exit 3: fatal: the fix did not take" in draft
    # A pipe inside a table cell does not split the row into more columns.
    for row in (line for line in draft.splitlines() if line.startswith("| ")):
        assert row.replace("\\|", "").count("|") == 4, row


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A fresh workspace (the shipped runbooks) and a database file that does not exist yet."""
    return Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")


def test_the_cli_prints_the_draft_or_writes_it_to_a_file(cli: Cli, tmp_path: Path) -> None:
    started = cli("runbook", LATENCY, "--run-id", "pm-1", "--mock-llm")
    assert started.returncode == 0, started.describe()
    printed = cli("postmortem", "pm-1")
    assert printed.returncode == 0, printed.describe()
    assert printed.stdout.startswith("# Post-mortem draft: ")
    assert "asked group:approvers to decide #1" in printed.stdout
    path = tmp_path / "pm.md"
    written = cli("postmortem", "pm-1", "-o", str(path))
    assert written.returncode == 0 and written.stdout == f"wrote {path}\n", written.describe()

    # The same facts; only the moment it was written differs.
    def facts(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("_Written by")]

    assert facts(path.read_text()) == facts(printed.stdout)


def test_the_cli_refuses_an_unknown_run_in_one_line(cli: Cli) -> None:
    assert_usage_error(cli("postmortem", "no-such-run"), "no-such-run")


async def test_an_incident_from_an_alert_says_what_fired_and_when_it_resolved(
    settings: Settings,
) -> None:
    """The alert's own times count: time to resolve runs from its first notification to its
    resolve, which may come after the run ended (kept on the incident, not the journal)."""
    disk = alertmanager_body("DiskAlmostFull", starts_at="2026-12-05T05:09:00Z")
    async with served(alert_settings(settings)) as app:
        answer = (await app.client.post("/alerts/alertmanager", json=disk)).json()
        run_id = answer["run_id"]
        await finished(app.service, run_id, Decision.APPROVE)
        resolve = alertmanager_body("DiskAlmostFull", "resolved", ends_at="2026-12-05T05:12:00Z")
        assert (await app.client.post("/alerts/alertmanager", json=resolve)).status_code == 202
        incident = await AlertService(app.service).incident_of_run(run_id)
        tree = await app.service.run_tree(run_id, calls=False, events=True)
    assert incident is not None and incident.resolved_at is not None
    draft = postmortem_of(tree, incident)
    fired = draft.split("## What fired", 1)[1].split("##", 1)[0]
    assert "DiskAlmostFull firing (1 firing; " in fired and "from alertmanager" in fired
    assert "No alert" not in draft
    timeline = [cells(line) for line in draft.splitlines() if line.startswith("| ")][1:]
    assert timeline[-1][1:] == ["alert", "resolved after the run ended"]
    started = min(incident.first_at, tree.root.created_at)
    expected = duration(incident.resolved_at - started)
    assert f"- **Time to resolve:** {expected} (" in draft


async def test_a_failed_gated_step_mitigates_nothing_on_the_card_or_in_the_draft(
    settings: Settings, workspace: Path
) -> None:
    """The approval's own result names the step and is ok; only the step's execution counts,
    and the alert card and the draft ask the same question of the journal."""
    write_runbook(
        workspace,
        "failing-fix",
        FAILING_RUNBOOK
        + "alerts:\n  - match: {alertname: FixFails}\n    params: {}\n    start: auto\n",
    )
    (workspace / "fail.py").write_text(FAIL_SCRIPT)
    allow(workspace, "fail.py")
    chosen = alert_settings(settings, allow_shell=True)
    async with served(chosen) as app:
        fired = (
            await app.client.post("/alerts/alertmanager", json=alertmanager_body("FixFails"))
        ).json()
        run_id = fired["run_id"]
        assert run_id, fired
        await finished(app.service, run_id, Decision.APPROVE)
        resolve = alertmanager_body("FixFails", "resolved", ends_at="2026-12-05T05:12:00Z")
        assert (await app.client.post("/alerts/alertmanager", json=resolve)).status_code == 202
        alerts = AlertService(app.service)
        card = await alerts.card(fired["incident"])
        incident = await alerts.incident_of_run(run_id)
        tree = await app.service.run_tree(run_id, calls=False, events=True)
    assert card.incident.resolved_at is not None
    assert card.mitigation is None
    draft = postmortem_of(tree, incident)
    assert f"- **Time to mitigate:** {NOT_MITIGATED}" in draft
    assert "### 1. `fix`: error" in draft
