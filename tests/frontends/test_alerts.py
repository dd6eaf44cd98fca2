"""Alert intake over HTTP (`POST /alerts/...`) and its incidents: one incident, one run; a
redelivery changes nothing; the incident chat's card and taps (the Bot API stand-in)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import ServiceError
from agent.frontends.alerts import (
    NO_BASIC_TOKEN,
    AlertmanagerBody,
    GenericAlert,
    alertmanager_notice,
    generic_notice,
)
from agent.http_server import HttpServer
from agent.service.alerts import AlertService
from agent.service.runs import RunService
from agent.settings import SecretStr, Settings
from tests.alert_harness import alert_settings, alertmanager_body
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    MALLORY,
    confirm_run,
    from_bot,
    keyboard_data,
    make_standin,
    running_bot,
    telegram_settings,
    undelivered,
    wait_for,
    wait_for_approval,
)
from tests.http_harness import served, wait_for_run

TOKEN = "alert-test-token-0123456789"
JSON = dict[str, Any]


def outbox_kinds(db: str) -> list[str]:
    """The outbox's entries, oldest first, by kind."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT kind FROM outbox ORDER BY id")]


def event_types(events: list[Any]) -> list[str]:
    return [event.type for event in events]


async def _post(client: httpx.AsyncClient, path: str, body: JSON, **kwargs: Any) -> httpx.Response:
    return await client.post(path, json=body, **kwargs)


def parked(run: JSON) -> bool:
    """The run waits for a person (its dry-run diagnostics done): its journal holds still."""
    return bool(run["status"] == "waiting_approval")


# -- intake ------------------------------------------------------------------------------------


async def test_an_ask_route_proposes_the_runbook_to_the_chat_and_starts_nothing(
    settings: Settings,
) -> None:
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts/alertmanager", alertmanager_body())
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["outcome"] == "opened"
        assert body["runbook_id"] == "api-latency-spike"
        assert body["params"] == {"service": "checkout-api", "namespace": "production"}
        assert body["run_id"] is None
        assert (await app.client.get("/runs")).json()["runs"] == []
    assert outbox_kinds(settings.db) == ["alert"]


async def test_an_auto_route_starts_one_run_that_journals_the_alert(settings: Settings) -> None:
    async with served(alert_settings(settings)) as app:
        answer = await _post(
            app.client, "/alerts/alertmanager", alertmanager_body("DiskAlmostFull")
        )
        assert answer.status_code == 202, answer.text
        run_id = answer.json()["run_id"]
        assert answer.json()["runbook_id"] == "disk-almost-full"
        run = (await app.client.get(f"/runs/{run_id}")).json()
        assert run["requested_by"] == "api:http"
        events = await app.service.events(run_id)
        received = [e for e in events if e.type == "alert_received"]
        assert len(received) == 1
        assert received[0].data["alertname"] == "DiskAlmostFull"
        assert received[0].data["started_by"] == "auto"
        assert received[0].data["first_at"] <= received[0].ts


async def test_a_redelivered_webhook_changes_nothing(settings: Settings) -> None:
    body = alertmanager_body("DiskAlmostFull")
    async with served(alert_settings(settings)) as app:
        first = (await _post(app.client, "/alerts/alertmanager", body)).json()
        await wait_for_run(app.client, first["run_id"], parked)
        journal = await app.service.events(first["run_id"])
        outbox = outbox_kinds(settings.db)
        again = await _post(app.client, "/alerts/alertmanager", body)
        assert again.status_code == 202
        assert again.json()["outcome"] == "unchanged"
        assert again.json()["run_id"] == first["run_id"]
        assert await app.service.events(first["run_id"]) == journal
        assert outbox_kinds(settings.db) == outbox
        assert len((await app.client.get("/runs")).json()["runs"]) == 1


async def test_a_refire_updates_the_open_run_and_the_resolve_is_journaled(
    settings: Settings,
) -> None:
    async with served(alert_settings(settings)) as app:
        first = (
            await _post(app.client, "/alerts/alertmanager", alertmanager_body("DiskAlmostFull"))
        ).json()
        run_id = first["run_id"]
        refire = await _post(
            app.client,
            "/alerts/alertmanager",
            alertmanager_body("DiskAlmostFull", instances=("a", "b")),
        )
        assert refire.json()["outcome"] == "updated"
        assert refire.json()["run_id"] == run_id
        resolved = await _post(
            app.client,
            "/alerts/alertmanager",
            alertmanager_body(
                "DiskAlmostFull", "resolved", ("a", "b"), ends_at="2026-12-05T05:12:00Z"
            ),
        )
        assert resolved.json()["outcome"] == "resolved"
        assert resolved.json()["run_id"] == run_id
        runs = (await app.client.get("/runs")).json()["runs"]
        assert [run["run_id"] for run in runs] == [run_id]
        types = event_types(await app.service.events(run_id))
        assert types.count("alert_updated") == 1
        assert types.count("alert_resolved") == 1
        updated = next(e for e in await app.service.events(run_id) if e.type == "alert_updated")
        assert updated.data["firing"] == 2
        incident = await AlertService(app.service).incident_of_run(run_id)
        assert incident is not None and incident.resolved_at is not None
        assert incident.first_at < incident.resolved_at


async def test_a_firing_after_the_run_ended_opens_a_new_incident(settings: Settings) -> None:
    async with served(alert_settings(settings)) as app:
        first = (
            await _post(app.client, "/alerts/alertmanager", alertmanager_body("DiskAlmostFull"))
        ).json()
        await app.client.post(f"/runs/{first['run_id']}/cancel")
        second = await _post(
            app.client,
            "/alerts/alertmanager",
            alertmanager_body("DiskAlmostFull", instances=("c",)),
        )
        assert second.json()["outcome"] == "opened"
        assert second.json()["run_id"] not in (None, first["run_id"])


async def test_an_alert_no_runbook_answers_is_accepted_counted_and_starts_nothing(
    settings: Settings,
) -> None:
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts/alertmanager", alertmanager_body("Watchdog"))
        assert answer.status_code == 202
        assert answer.json()["outcome"] == "unmatched"
        assert "no runbook answers this alert" in answer.json()["message"]
        assert (await app.client.get("/runs")).json()["runs"] == []
        metrics = (await app.client.get("/metrics")).text
        assert 'loom_ops_alerts_received_total{outcome="unmatched"} 1.0' in metrics
    assert outbox_kinds(settings.db) == []


async def test_grafana_and_generic_alerts_are_accepted(settings: Settings) -> None:
    grafana = alertmanager_body("HighLatency")
    del grafana["version"], grafana["groupKey"]
    grafana.update(
        {"orgId": 1, "title": "[FIRING:1] HighLatency", "state": "alerting", "message": "…"}
    )
    grafana["alerts"][0].update({"values": {"A": 2.4}, "valueString": "[ var='A' value=2.4 ]"})
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts/grafana", grafana)
        assert answer.status_code == 202, answer.text
        assert answer.json()["outcome"] == "opened"
        generic = {"name": "KubeDeploymentRolloutStuck", "labels": {"deployment": "cart"}}
        answer = await _post(app.client, "/alerts", generic)
        assert answer.status_code == 202, answer.text
        assert answer.json()["runbook_id"] == "failed-deploy-rollback"
        assert answer.json()["params"]["service"] == "cart"
        again = await _post(app.client, "/alerts", generic)
        assert again.json()["outcome"] == "unchanged"


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        ("/alerts/alertmanager", {"version": "3"}, "version"),
        ("/alerts/alertmanager", {"groupKey": None}, "groupKey"),
        ("/alerts/alertmanager", {"status": "burning"}, "status"),
        ("/alerts/alertmanager", {"alerts": []}, "alerts"),
        ("/alerts/alertmanager", {"commonLabels": {"a": 1}}, "commonLabels.a"),
        ("/alerts/grafana", {"alerts": None}, "alerts"),
    ],
)
async def test_a_malformed_webhook_is_a_422_naming_the_field(
    settings: Settings, path: str, change: JSON, field: str
) -> None:
    body = alertmanager_body() | change
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, path, body)
        assert answer.status_code == 422
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"].startswith(field)
        assert (await app.client.get("/runs")).json()["runs"] == []
    assert outbox_kinds(settings.db) == []


async def test_a_generic_alert_with_a_field_it_does_not_know_is_a_422(settings: Settings) -> None:
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts", {"name": "X", "severity": "page"})
        assert answer.status_code == 422
        assert answer.json()["error"].startswith("severity")
        not_json = await app.client.post(
            "/alerts", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422
        # A character offset is no field: the answer says the body is not JSON, and where.
        assert not_json.json() == {
            "error": "the body is not JSON: Expecting property name enclosed in double quotes "
            "at character 1"
        }


async def test_basic_auth_takes_a_token_as_its_password(settings: Settings) -> None:
    guarded = alert_settings(settings, api_token=SecretStr(TOKEN))

    def basic(password: str) -> dict[str, str]:
        raw = base64.b64encode(f"alertmanager:{password}".encode()).decode()
        return {"authorization": f"Basic {raw}"}

    async with served(guarded) as app:
        body = alertmanager_body()
        assert (await _post(app.client, "/alerts/alertmanager", body)).status_code == 401
        wrong = await _post(app.client, "/alerts/alertmanager", body, headers=basic("nope"))
        assert wrong.status_code == 401
        # It sent a password, not a bearer token: the answer says what the password must be.
        assert wrong.json() == {"error": NO_BASIC_TOKEN}
        assert wrong.headers["www-authenticate"] == "Basic"
        assert (await app.client.get("/runs", headers=basic(TOKEN))).status_code == 401
        right = await _post(app.client, "/alerts/alertmanager", body, headers=basic(TOKEN))
        assert right.status_code == 202, right.text
        bearer = {"authorization": f"Bearer {TOKEN}"}
        again = await _post(app.client, "/alerts/grafana", body, headers=bearer)
        assert again.status_code == 202, again.text


async def test_another_sites_post_to_the_alert_routes_is_refused(settings: Settings) -> None:
    async with served(alert_settings(settings)) as app:
        foreign = await _post(
            app.client,
            "/alerts/alertmanager",
            alertmanager_body(),
            headers={"origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
        form = await app.client.post(
            "/alerts", content=b"name=X", headers={"content-type": "text/plain"}
        )
        assert form.status_code == 403
    assert outbox_kinds(settings.db) == []


# -- one incident, one run ---------------------------------------------------------------------


async def test_two_concurrent_deliveries_of_a_new_group_start_one_run(
    db_url: str, workspace: Path
) -> None:
    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester"
    )
    # Two processes' worth: each delivery through its own service and store connections.
    services = [await RunService.open(settings) for _ in range(2)]
    try:
        for round_ in range(3):  # a few rounds: each a new group, delivered twice at once
            group = f"group-{round_}"
            notices = [
                alertmanager_notice(
                    AlertmanagerBody.model_validate(
                        alertmanager_body("DiskAlmostFull", instances=i, group_key=group)
                    )
                )
                for i in (("a",), ("a", "b"))
            ]
            answers = await asyncio.gather(
                *(
                    AlertService(service).receive(notice, "api:http")
                    for service, notice in zip(services, notices, strict=True)
                )
            )
            assert sorted(a.outcome for a in answers) == ["opened", "updated"]
            assert len({a.run_id for a in answers}) == 1
        runs = await services[0].list()
        assert len(runs) == 3
    finally:
        for service in services:
            await service.close()


# -- the incident chat -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def alert_bench(
    settings: Settings,
) -> AsyncIterator[tuple[Any, RunService, httpx.AsyncClient]]:
    """The stand-in, the bot, and the HTTP API, over one store (as `serve --telegram`)."""
    from agent.frontends.http_api import create_app
    from bot.standin import StandInServer

    standin = make_standin()
    async with (
        StandInServer(standin) as server,
        running_bot(settings, telegram_settings(server)) as service,
        HttpServer(create_app(service)) as http,
        httpx.AsyncClient(base_url=http.url, timeout=15) as client,
    ):
        yield standin, service, client


def alert_cards(standin: Any) -> list[JSON]:
    return [m for m in from_bot(standin, INCIDENTS) if m.get("text", "").startswith("🚨")]


async def test_the_card_starts_the_run_as_the_person_who_taps(settings: Settings) -> None:
    async with alert_bench(alert_settings(settings)) as (standin, service, client):
        opened = (await _post(client, "/alerts/alertmanager", alertmanager_body())).json()
        await wait_for(standin, lambda: alert_cards(standin))
        card = alert_cards(standin)[0]
        assert "HighLatency" in card["text"] and "api-latency-spike" in card["text"]
        assert "service=checkout-api" in card["text"]
        buttons = keyboard_data(card)
        assert [b.rsplit(":", 1)[1] for b in buttons] == ["s", "i"]  # no Alertmanager URL
        standin.inject_callback(INCIDENTS, card["message_id"], ALICE, buttons[0])
        await wait_for(standin, lambda: "Started by" in alert_cards(standin)[0]["text"])
        card = alert_cards(standin)[0]
        assert "@alice" in card["text"] and not keyboard_data(card)
        incident = await AlertService(service).incident(opened["incident"])
        run = await service.get(incident.run_id)
        assert run.requested_by == f"telegram:{ALICE}"
        assert len(alert_cards(standin)) == 1  # edited in place, never a second card


async def ignored_card(standin: Any, client: httpx.AsyncClient) -> JSON:
    """An alert's card, once Bob tapped Ignore on it (as it was before the tap)."""
    await _post(client, "/alerts/alertmanager", alertmanager_body())
    await wait_for(standin, lambda: alert_cards(standin))
    card = alert_cards(standin)[0]
    _, ignore = keyboard_data(card)
    standin.inject_callback(INCIDENTS, card["message_id"], BOB, ignore)
    await wait_for(standin, lambda: "Ignored by @bob" in alert_cards(standin)[0]["text"])
    return card


async def test_ignore_closes_the_card_and_a_second_tap_changes_nothing(settings: Settings) -> None:
    async with alert_bench(alert_settings(settings)) as (standin, service, client):
        card = await ignored_card(standin, client)
        start, _ = keyboard_data(card)
        late = standin.inject_callback(
            INCIDENTS, card["message_id"], MALLORY, start, require_button=False
        )
        await wait_for(standin, lambda: standin.callback_answer(late))
        answer = standin.callback_answer(late)
        assert answer is not None and "ignored by telegram:" in answer.get("text", "")
        assert await service.list() == []


async def test_an_ignored_card_in_a_forum_closes_its_topic_and_the_chat_goes_on(
    settings: Settings,
) -> None:
    """In a forum the card opens the incident's topic; Ignore ends the incident with no run,
    so the topic is closed, and a run started in the chat afterwards gets its news."""
    async with alert_bench(alert_settings(settings)) as (standin, _, client):
        standin.add_chat(INCIDENTS, "supergroup", "Incidents", is_forum=True)
        await ignored_card(standin, client)
        await wait_for(standin, lambda: all(t["is_closed"] for t in standin.topics(INCIDENTS)))
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        await wait_for_approval(standin, INCIDENTS)
        [incident_topic, run_topic] = standin.topics(INCIDENTS)
        assert incident_topic["is_closed"] and not run_topic["is_closed"]
        assert len(standin.calls("closeForumTopic")) == 1
        await wait_for(standin, lambda: undelivered(settings.db) == 0)


async def test_a_resolve_after_the_run_ended_is_shown_after_the_step_that_mitigated_it(
    settings: Settings,
) -> None:
    from agent.records import Decision
    from bot.alerts import card_text, resolved_line

    async with served(alert_settings(settings)) as app:
        opened = (await _post(app.client, "/alerts/alertmanager", alertmanager_body())).json()
        alerts = AlertService(app.service)
        run = await alerts.start(opened["incident"], INCIDENTS, "cli:oncall")
        await wait_for_run(app.client, run.id, parked)
        await app.service.decide(run.id, Decision.APPROVE, "cli:oncall", wait=False)
        ended = await wait_for_run(app.client, run.id)
        assert ended["status"] == "succeeded", ended
        journal = await app.service.events(run.id)
        resolved = await _post(
            app.client, "/alerts/alertmanager", alertmanager_body(status="resolved")
        )
        assert resolved.json()["outcome"] == "resolved"
        # The ended run's journal stays as its summary published it; the incident keeps it.
        assert await app.service.events(run.id) == journal
        card = await alerts.card(opened["incident"])
        assert card.incident.resolved_at is not None and not card.incident.is_open
        assert card.mitigation is not None and card.mitigation.step_id == "scale-out"
        line = resolved_line(card)
        assert line.startswith("Resolved at ")
        assert "after Scale the deployment out (step scale-out)" in line
        assert line in card_text(card, card.incident.resolved_at)


async def test_only_people_who_may_start_the_runbook_may_start_it_from_the_card(
    settings: Settings,
) -> None:
    runbook = settings.workspace / "runbooks" / "api-latency-spike.yaml"
    runbook.write_text(
        runbook.read_text().replace("\nsteps:\n", "\nstarters: [group:approvers]\nsteps:\n", 1)
    )
    async with alert_bench(alert_settings(settings)) as (standin, service, client):
        await _post(client, "/alerts/alertmanager", alertmanager_body())
        await wait_for(standin, lambda: alert_cards(standin))
        card = alert_cards(standin)[0]
        start, _ignore = keyboard_data(card)
        refused = standin.inject_callback(INCIDENTS, card["message_id"], ALICE, start)
        await wait_for(standin, lambda: standin.callback_answer(refused))
        answer = standin.callback_answer(refused) or {}
        assert answer.get("show_alert") and "may not start" in answer.get("text", ""), answer
        assert await service.list() == []
        standin.inject_callback(INCIDENTS, card["message_id"], BOB, start)
        await wait_for(standin, lambda: "Started by @bob" in alert_cards(standin)[0]["text"])
        [run] = await service.list()
        assert run.requested_by == f"telegram:{BOB}"


async def test_an_incident_lives_through_start_refire_resolve_and_ignore_on_both_engines(
    db_url: str, workspace: Path
) -> None:
    settings = Settings(
        _env_file=None,
        db=db_url,
        workspace=workspace,
        mock_llm=True,
        user="tester",
        alert_chat_id=INCIDENTS,
    )

    def notice(alertname: str, *instances: str, status: str = "firing") -> Any:
        body = alertmanager_body(alertname, status, instances)
        return alertmanager_notice(AlertmanagerBody.model_validate(body))

    service = await RunService.open(settings)
    try:
        alerts = AlertService(service)
        opened = await alerts.receive(notice("HighLatency", "a"), "api:http")
        assert (opened.outcome, opened.run_id) == ("opened", None)
        assert opened.incident_id is not None
        run = await alerts.start(opened.incident_id, INCIDENTS, "cli:oncall")
        again = await alerts.start(opened.incident_id, INCIDENTS, "cli:oncall")
        assert again.id == run.id  # a second tap finds the first one's run
        updated = await alerts.receive(notice("HighLatency", "a", "b"), "api:http")
        assert (updated.outcome, updated.run_id) == ("updated", run.id)
        resolved = await alerts.receive(
            notice("HighLatency", "a", "b", status="resolved"), "api:http"
        )
        assert resolved.outcome == "resolved"
        redelivered = await alerts.receive(
            notice("HighLatency", "a", "b", status="resolved"), "api:http"
        )
        assert redelivered.outcome == "unchanged"
        types = [e.type for e in await service.events(run.id) if e.type.startswith("alert_")]
        assert types[0] == "alert_received"
        if "alert_updated" in types:  # unless the run ended first (a fast mock drive)
            assert types.count("alert_updated") == 1
        incident = await alerts.incident_of_run(run.id)
        assert incident is not None and incident.decided_by == "cli:oncall"
        assert incident.notifications == 3 and incident.resolved_at is not None

        other = await alerts.receive(notice("KubeDeploymentRolloutStuck", "a"), "api:http")
        assert other.incident_id is not None
        ignored = await alerts.ignore(other.incident_id, INCIDENTS, f"telegram:{BOB}")
        assert (ignored.state, ignored.decided_by) == ("ignored", f"telegram:{BOB}")
        with pytest.raises(ServiceError, match="ignored by"):
            await alerts.start(other.incident_id, INCIDENTS, f"telegram:{BOB}")
        with pytest.raises(ServiceError, match="no such alert in this chat"):
            await alerts.ignore(other.incident_id, INCIDENTS - 1, f"telegram:{BOB}")
        refire = await alerts.receive(notice("KubeDeploymentRolloutStuck", "a", "b"), "api:http")
        assert (refire.outcome, refire.incident_id) == ("updated", other.incident_id)
        assert [r.id for r in await service.list()] == [run.id]
    finally:
        await service.close()


async def test_a_card_queued_while_no_bot_runs_reaches_the_chat_when_it_starts(
    settings: Settings,
) -> None:
    from bot.standin import StandInServer

    chosen = alert_settings(settings)
    async with served(chosen) as app:
        answer = await _post(app.client, "/alerts/alertmanager", alertmanager_body())
        assert answer.json()["outcome"] == "opened"
    standin = make_standin()
    async with StandInServer(standin) as server, running_bot(chosen, telegram_settings(server)):
        await wait_for(standin, lambda: alert_cards(standin))
        [card] = alert_cards(standin)
        assert "HighLatency" in card["text"] and keyboard_data(card)


# -- what an alert may not do ------------------------------------------------------------------


def route_on_severity(settings: Settings) -> None:
    """api-latency-spike answers any `severity=page` alert, on its own: the alert's name is
    then whatever the sender says."""
    path = settings.workspace / "runbooks" / "api-latency-spike.yaml"
    text = path.read_text()
    path.write_text(
        text.replace(
            "  - match: {alertname: HighLatency}\n", "  - match: {severity: page}\n"
        ).replace("    start: ask\n", "    start: auto\n", 1)
    )


@pytest.mark.parametrize(
    "alertname",
    [
        "HighLatency replicas=50 health_host=evil.example",
        "replicas=50",
        "runbook=disk-almost-full",
        "Disk'Full",
        'a "quoted" name',
        "back\\slash\nnew line",
    ],
)
def test_a_run_request_gives_exactly_the_routes_params_whatever_the_alert_is_called(
    alertname: str,
) -> None:
    from agent.runbook.request import parse_request
    from agent.service.alerts import run_request

    params = {"service": "checkout-api", "namespace": "production", "note": "it's a b=c"}
    parsed = parse_request(run_request("api-latency-spike", params, alertname))
    assert parsed.runbook == "api-latency-spike"
    assert parsed.params == params


async def test_an_alert_name_sets_no_runbook_param_of_the_run(settings: Settings) -> None:
    route_on_severity(settings)
    body = alertmanager_body(
        "HighLatency replicas=50 health_host=evil.example", labels={"severity": "page"}
    )
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts/alertmanager", body)
        assert answer.status_code == 202, answer.text
        said = answer.json()
        assert said["outcome"] == "opened"
        assert said["params"] == {"service": "checkout-api", "namespace": "production"}
        run = await wait_for_run(app.client, said["run_id"], parked)
        # The runbook's defaults, not the alert's words.
        assert run["params"]["replicas"] == 6
        assert "health_host" not in run["params"] or run["params"]["health_host"] != (
            "evil.example"
        )
        assert {k: run["params"][k] for k in said["params"]} == said["params"]
        for approval in await app.service.store.list_approvals(said["run_id"]):
            assert "evil.example" not in approval.action and "50" not in approval.action


async def test_an_alert_name_with_a_quote_opens_once_and_its_redelivery_changes_nothing(
    settings: Settings,
) -> None:
    route_on_severity(settings)
    body = alertmanager_body("Disk'Full", labels={"severity": "page"})
    async with served(alert_settings(settings)) as app:
        first = await _post(app.client, "/alerts/alertmanager", body)
        assert first.status_code == 202, first.text
        assert first.json()["outcome"] == "opened" and first.json()["run_id"]
        again = await _post(app.client, "/alerts/alertmanager", body)
        assert again.status_code == 202, again.text
        assert again.json()["outcome"] == "unchanged"
        assert again.json()["run_id"] == first.json()["run_id"]


# -- an `auto` start that may not happen -------------------------------------------------------


def only_oncall_starts_disk_runs(settings: Settings) -> None:
    """disk-almost-full (an `auto` route) may be started by the oncall group only: sam."""
    path = settings.workspace / "runbooks" / "disk-almost-full.yaml"
    path.write_text(
        path.read_text().replace(
            "approvers: [group:approvers]\n",
            "approvers: [group:approvers]\nstarters: [group:oncall]\n",
        )
    )
    (settings.workspace / "people.yaml").write_text(
        "people:\n  - name: sam\n    cli: sam\n    groups: [oncall]\n"
    )


async def test_an_auto_start_its_starters_refuse_is_proposed_to_a_person_with_the_reason(
    settings: Settings,
) -> None:
    from bot.alerts import card_buttons, card_text

    only_oncall_starts_disk_runs(settings)
    async with served(alert_settings(settings)) as app:
        answer = await _post(
            app.client, "/alerts/alertmanager", alertmanager_body("DiskAlmostFull")
        )
        assert answer.status_code == 202, answer.text
        said = answer.json()
        assert said["outcome"] == "refused"
        assert "may not start" in said["message"] and "proposed to the chat" in said["message"]
        assert said["run_id"] is None
        alerts = AlertService(app.service)
        card = await alerts.card(said["incident"])
        assert card.incident.state == "proposed" and card.incident.decided_by is None
        assert card.incident.start_refused and "may not start" in card.incident.start_refused
        text = card_text(card, card.incident.last_at)
        assert "Not started on its own: " in text and "Started on its own" not in text
        buttons = card_buttons(card)
        assert buttons is not None
        assert buttons.inline_keyboard[0][0].callback_data == f"al:{said['incident']}:s"
        # A re-fire updates the proposed incident; it is no 403.
        refire = await _post(
            app.client,
            "/alerts/alertmanager",
            alertmanager_body("DiskAlmostFull", instances=("a", "b")),
        )
        assert refire.status_code == 202, refire.text
        assert refire.json()["outcome"] == "updated"
        assert await app.service.list() == []
        # A person who may start it does, from the card.
        run = await alerts.start(said["incident"], INCIDENTS, "cli:sam")
        assert run.requested_by == "cli:sam"
        started = await alerts.incident(said["incident"])
        assert (started.state, started.decided_by) == ("started", "cli:sam")


async def test_an_auto_start_over_the_active_run_cap_is_proposed_with_the_reason(
    settings: Settings, workspace: Path
) -> None:
    from tests.support import SLOW_RUNBOOK, allow, lines, write_runbook

    write_runbook(workspace, "slow-drill", SLOW_RUNBOOK)
    allow(workspace, "append.py", "slow", "60")
    one = alert_settings(settings, max_active_runs=1, allow_shell=True)
    async with served(one) as app:
        body = {"message": "slow-drill", "run_id": "busy", "role": "runbook"}
        assert (await app.client.post("/runs", json=body)).status_code == 201
        await wait_for_run(app.client, "busy", lambda r: lines(workspace) == ["slow"])
        answer = await _post(
            app.client, "/alerts/alertmanager", alertmanager_body("DiskAlmostFull")
        )
        assert answer.status_code == 202, answer.text
        said = answer.json()
        assert said["outcome"] == "refused" and "active" in said["message"], said
        assert said["run_id"] is None
        incident = await AlertService(app.service).incident(said["incident"])
        assert incident.state == "proposed" and incident.decided_by is None
        assert incident.start_refused and "active" in incident.start_refused
        assert [r.id for r in await app.service.list()] == ["busy"]
        assert (await app.client.post("/runs/busy/cancel")).status_code == 200
        run = await AlertService(app.service).start(said["incident"], INCIDENTS, "cli:oncall")
        assert run.id == incident.run_id


# -- redeliveries ------------------------------------------------------------------------------


async def test_a_late_redelivery_of_an_old_resolve_leaves_the_newer_incident_open(
    db_url: str, workspace: Path
) -> None:
    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester"
    )

    def notice(status: str, starts_at: str, ends_at: str = "0001-01-01T00:00:00Z") -> Any:
        body = alertmanager_body(status=status, starts_at=starts_at, ends_at=ends_at)
        return alertmanager_notice(AlertmanagerBody.model_validate(body))

    resolve = notice("resolved", "2026-12-05T05:00:00Z", "2026-12-05T05:10:00Z")
    service = await RunService.open(settings)
    try:
        alerts = AlertService(service)
        first = await alerts.receive(notice("firing", "2026-12-05T05:00:00Z"), "api:http")
        assert (await alerts.receive(resolve, "api:http")).outcome == "resolved"
        second = await alerts.receive(notice("firing", "2026-12-05T06:00:00Z"), "api:http")
        assert second.outcome == "opened" and second.incident_id != first.incident_id
        assert second.incident_id is not None
        late = await alerts.receive(resolve, "api:http")
        assert late.outcome == "unchanged" and late.incident_id == first.incident_id
        newer = await alerts.incident(second.incident_id)
        assert newer.is_open and newer.status == "firing" and newer.resolved_at is None
        assert newer.notifications == 1
    finally:
        await service.close()


async def test_a_generic_alert_that_fires_again_after_its_resolve_opens_a_new_incident(
    db_url: str, workspace: Path
) -> None:
    """A generic alert has no start time: the same body after a resolve is a new firing, while
    a repeat before anything else happened is a redelivery."""
    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester"
    )

    def notice(status: str) -> Any:
        body = {"name": "HighLatency", "labels": {"service": "cart"}, "status": status}
        return generic_notice(GenericAlert.model_validate(body))

    service = await RunService.open(settings)
    try:
        alerts = AlertService(service)
        outcomes = [await alerts.receive(notice(s), "api:http") for s in ("firing", "firing")]
        assert [a.outcome for a in outcomes] == ["opened", "unchanged"]
        first = outcomes[0].incident_id
        resolves = [await alerts.receive(notice("resolved"), "api:http") for _ in range(2)]
        assert [a.outcome for a in resolves] == ["resolved", "unchanged"]
        again = [await alerts.receive(notice(s), "api:http") for s in ("firing", "firing")]
        assert [a.outcome for a in again] == ["opened", "unchanged"]
        second = again[0].incident_id
        assert second is not None and second != first
        assert (await alerts.receive(notice("resolved"), "api:http")).outcome == "resolved"
        assert not (await alerts.incident(second)).is_open
    finally:
        await service.close()


# -- bodies ------------------------------------------------------------------------------------


def node_exporter_storm(count: int) -> JSON:
    """One notification of `count` node-exporter alerts (about 900 bytes each)."""
    body = alertmanager_body("NodeFilesystemAlmostOutOfSpace", instances=())
    body["alerts"] = [
        {
            "status": "firing",
            "labels": {
                "alertname": "NodeFilesystemAlmostOutOfSpace",
                "device": "/dev/nvme0n1p1",
                "fstype": "ext4",
                "instance": f"node-{n:03d}.prod.internal:9100",
                "job": "node-exporter",
                "mountpoint": "/var",
                "severity": "warning",
            },
            "annotations": {
                "description": f"Filesystem on /dev/nvme0n1p1 at node-{n:03d} has only 4.8% "
                "available space left and is filling up fast. " * 4,
                "runbook_url": "https://runbooks.prometheus-operator.dev/runbooks/node/"
                "nodefilesystemalmostoutofspace",
                "summary": "Filesystem has less than 5% space left.",
            },
            "startsAt": "2026-12-05T05:09:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": f"http://prometheus:9090/graph?g0.expr=node_filesystem_avail{n}",
            "fingerprint": f"fp-{n:04d}",
        }
        for n in range(count)
    ]
    body["commonLabels"] = {"alertname": "NodeFilesystemAlmostOutOfSpace", "mountpoint": "/var"}
    return body


async def test_an_alert_storm_over_the_request_body_limit_is_accepted(
    settings: Settings,
) -> None:
    storm = node_exporter_storm(80)
    size = len(httpx.Request("POST", "http://x", json=storm).content)
    assert size > settings.max_body_bytes
    async with served(alert_settings(settings)) as app:
        answer = await _post(app.client, "/alerts/alertmanager", storm)
        assert answer.status_code == 202, answer.text
        assert answer.json()["runbook_id"] == "disk-almost-full"
        # The rest of the API keeps its own limit.
        big = {"message": "disk almost full " + "x" * size}
        assert (await app.client.post("/runs", json=big)).status_code == 413


async def test_an_alert_body_over_its_own_limit_is_a_413(settings: Settings) -> None:
    storm = node_exporter_storm(80)
    size = len(httpx.Request("POST", "http://x", json=storm).content)
    async with served(alert_settings(settings, max_alert_body_bytes=size - 1)) as app:
        answer = await _post(app.client, "/alerts/alertmanager", storm)
        assert answer.status_code == 413
        assert answer.json() == {"error": f"request body over {size - 1} bytes"}
        assert (await app.client.get("/runs")).json()["runs"] == []
    assert outbox_kinds(settings.db) == []


# -- the incident chat, configured or not ------------------------------------------------------


async def test_an_ask_route_with_no_incident_chat_says_nobody_can_start_it_from_chat(
    settings: Settings,
) -> None:
    async with served(settings) as app:  # no TELEGRAM_ALERT_CHAT_ID, no bot chats
        answer = await _post(app.client, "/alerts/alertmanager", alertmanager_body())
        said = answer.json()
        assert said["outcome"] == "opened" and said["run_id"] is None
        assert "proposed to the chat" not in said["message"]
        assert "TELEGRAM_ALERT_CHAT_ID" in said["message"] and "start: auto" in said["message"]


def test_an_alert_chat_the_bot_does_not_serve_is_refused_at_start_up(
    settings: Settings,
) -> None:
    from agent.frontends.serving import ServingRefused, check_telegram

    chosen = settings.model_copy(
        update={"alert_chat_id": -100999, "telegram_chats": [str(INCIDENTS)]}
    )
    with pytest.raises(ServingRefused) as refused:
        check_telegram(chosen)
    said = str(refused.value)
    assert "TELEGRAM_ALERT_CHAT_ID -100999" in said and "\n" not in said
    served_chat = settings.model_copy(
        update={"alert_chat_id": INCIDENTS, "telegram_chats": [str(INCIDENTS)]}
    )
    assert served_chat.alert_chat_refusal() is None


async def test_doctor_reports_an_alert_chat_the_bot_does_not_serve(settings: Settings) -> None:
    from agent.frontends.doctor import diagnose

    chosen = settings.model_copy(
        update={
            "alert_chat_id": -100999,
            "telegram_chats": [str(INCIDENTS)],
            "telegram_bot_token": SecretStr("123456:" + "A" * 35),
        }
    )
    findings = await diagnose(chosen, timeout=1)
    assert any(
        f.severity == "error" and "TELEGRAM_ALERT_CHAT_ID -100999" in f.message for f in findings
    ), [f.line() for f in findings]


# -- Silence 1h against an Alertmanager that drips its answer ----------------------------------


@contextlib.asynccontextmanager
async def dripping_alertmanager() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A server on 127.0.0.1 that takes the silence request, then answers a byte at a time
    (each read well within httpx's per-read timeout, the whole answer never): its URL, set
    when the request came, and set when the caller gave up (the connection closed)."""
    asked, gave_up = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 100000\r\n\r\n")
        try:
            while not reader.at_eof():
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.2)
        except (ConnectionError, OSError):
            pass
        finally:
            gave_up.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", asked, gave_up
    finally:
        server.close()


async def test_a_silence_call_gives_up_after_its_timeout_however_alertmanager_drips(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.service.alerts as service_alerts

    monkeypatch.setattr(service_alerts, "ALERTMANAGER_TIMEOUT", 1.0)
    async with dripping_alertmanager() as (url, asked, gave_up):
        chosen = alert_settings(settings, alertmanager_url=url)
        async with served(chosen) as app:
            opened = (await _post(app.client, "/alerts/alertmanager", alertmanager_body())).json()
            alerts = AlertService(app.service)
            # A guard, not a measure: the old per-read timeout held the call for minutes.
            async with asyncio.timeout(30):
                with pytest.raises(ServiceError, match="did not answer within 1 s"):
                    await alerts.silence(opened["incident"], INCIDENTS, "cli:oncall")
            assert asked.is_set()
            async with asyncio.timeout(30):
                await gave_up.wait()
            incident = await alerts.incident(opened["incident"])
            assert incident.silence_id is None and incident.silenced_by is None


async def test_a_silence_tap_is_answered_before_alertmanager_is_asked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.service.alerts as service_alerts

    monkeypatch.setattr(service_alerts, "ALERTMANAGER_TIMEOUT", 2.0)
    async with (
        dripping_alertmanager() as (url, asked, gave_up),
        alert_bench(alert_settings(settings, alertmanager_url=url)) as (standin, _, client),
    ):
        await _post(client, "/alerts/alertmanager", alertmanager_body())
        await wait_for(standin, lambda: alert_cards(standin))
        card = alert_cards(standin)[0]
        silence = next(d for d in keyboard_data(card) if d.endswith(":m"))
        tap = standin.inject_callback(INCIDENTS, card["message_id"], BOB, silence)
        await wait_for(standin, lambda: standin.callback_answer(tap))
        assert not gave_up.is_set()  # Alertmanager was still being asked
        answer = standin.callback_answer(tap) or {}
        assert "Asking Alertmanager" in answer.get("text", "") and not answer.get("show_alert")

        def said_why() -> list[JSON]:
            return [
                m
                for m in from_bot(standin, INCIDENTS)
                if m.get("text", "").startswith("🔕 Not silenced")
            ]

        await wait_for(standin, said_why)
        assert "did not answer within 2 s" in said_why()[0]["text"]
        assert asked.is_set()


async def test_an_incident_from_before_the_upgrade_reads_and_takes_its_notifications(
    db_url: str, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incident the previous schema (22) wrote reads with no refusal after the upgrade,
    its redelivered notification changes nothing and a re-fire updates it."""
    import time

    from agent.service.alerts import group_digest, notice_digest
    from agent.store import RunStore, postgres, sqlite
    from tests.support import raw_rows

    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester"
    )
    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        monkeypatch.setattr(
            engine, "migrations", lambda _pkg, shipped=shipped: [m for m in shipped if m[0] <= 22]
        )
    await (await RunStore.open(db_url)).close()  # the schema as the previous version left it
    notice = alertmanager_notice(AlertmanagerBody.model_validate(alertmanager_body()))
    now = time.time()
    group = group_digest(notice)
    raw_rows(
        db_url,
        "INSERT INTO alert_incidents (source, group_key, open_key, alertname, labels, "
        "annotations, matchers, runbook_id, params, start_mode, state, status, firing, "
        "notifications, run_id, chat_id, first_at, last_at) VALUES ('alertmanager', ?, ?, "
        "'HighLatency', '{}', '{}', '{}', 'api-latency-spike', '{}', 'ask', 'proposed', "
        "'firing', 1, 1, 'al-old-1', NULL, ?, ?)",
        (group, group, now, now),
    )
    raw_rows(
        db_url,
        "INSERT INTO alert_notifications (incident_id, digest, status, firing, received_at) "
        "SELECT id, ?, 'firing', 1, ? FROM alert_incidents",
        (notice_digest(notice), now),
    )
    monkeypatch.undo()

    service = await RunService.open(settings)
    try:
        alerts = AlertService(service)
        again = await alerts.receive(notice, "api:http")
        assert again.outcome == "unchanged" and again.incident_id is not None
        incident = await alerts.incident(again.incident_id)
        assert incident.state == "proposed" and incident.start_refused is None
        refire = alertmanager_notice(
            AlertmanagerBody.model_validate(alertmanager_body(instances=("a", "b")))
        )
        updated = await alerts.receive(refire, "api:http")
        assert (updated.outcome, updated.incident_id) == ("updated", again.incident_id)
    finally:
        await service.close()
