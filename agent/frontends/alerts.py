"""Alert intake over HTTP: `POST /alerts/alertmanager` (Prometheus Alertmanager's webhook,
`version: "4"`), `POST /alerts/grafana` (Grafana's unified alerting webhook) and `POST
/alerts` (a generic body), each read into one `AlertNotice` for the AlertService.

Authenticated as the rest of the API (a bearer token) or with HTTP basic auth whose password
is a token, since Alertmanager's `http_config` can send either. Every answer is 202 with what
came of the notification; a body that is no such webhook is a 422 with the field it lacks. A
body may be up to LOOM_OPS_MAX_ALERT_BODY_BYTES (an alert storm), not the API's usual limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from agent.frontends.http_api import BEARER, Caller, authorized
from agent.frontends.openapi import errors
from agent.records import AlertItem, AlertNotice
from agent.service.alerts import AlertAnswer, AlertService

MAX_KEY = 4096  # characters of a group key
MAX_ALERTS = 1000  # alerts in one notification
NO_BASIC_TOKEN = "missing or wrong token: basic auth takes a loom-ops token as its password"
Status = Literal["firing", "resolved"]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Value = Annotated[str, StringConstraints(max_length=4096)]
LabelSet = dict[Name, Value]

# -- bodies ------------------------------------------------------------------------------------


class WebhookAlert(BaseModel):
    """One alert of an Alertmanager or Grafana notification."""

    model_config = ConfigDict(extra="ignore")  # the sender's newer fields are not ours

    status: Status
    labels: LabelSet
    annotations: LabelSet = Field(default_factory=dict)
    startsAt: str | None = Field(None, max_length=64)  # the sender's names
    endsAt: str | None = Field(None, max_length=64)
    fingerprint: str | None = Field(None, max_length=256)
    generatorURL: str | None = Field(None, max_length=MAX_KEY)


class AlertmanagerBody(BaseModel):
    """Prometheus Alertmanager's webhook (`version: "4"`)."""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"]
    groupKey: str = Field(min_length=1, max_length=MAX_KEY)
    status: Status
    receiver: str = Field(max_length=MAX_KEY)
    groupLabels: LabelSet = Field(default_factory=dict)
    commonLabels: LabelSet = Field(default_factory=dict)
    commonAnnotations: LabelSet = Field(default_factory=dict)
    externalURL: str = Field("", max_length=MAX_KEY)
    truncatedAlerts: int = Field(0, ge=0)
    alerts: list[WebhookAlert] = Field(min_length=1, max_length=MAX_ALERTS)


class GrafanaBody(BaseModel):
    """Grafana's unified alerting webhook: Alertmanager's shape with fields of its own
    (`title`, `state`, `message`, `orgId`, ...), which are accepted and not used."""

    model_config = ConfigDict(extra="ignore")

    status: Status
    groupKey: str | None = Field(None, max_length=MAX_KEY)
    receiver: str = Field("", max_length=MAX_KEY)
    groupLabels: LabelSet = Field(default_factory=dict)
    commonLabels: LabelSet = Field(default_factory=dict)
    commonAnnotations: LabelSet = Field(default_factory=dict)
    alerts: list[WebhookAlert] = Field(min_length=1, max_length=MAX_ALERTS)


class GenericAlert(BaseModel):
    """One alert from anything else: its name, labels, annotations and status; `key` groups
    notifications into one incident (default: the name and labels)."""

    model_config = ConfigDict(extra="forbid")  # our own shape: a typo is a 422

    name: Name
    labels: LabelSet = Field(default_factory=dict)
    annotations: LabelSet = Field(default_factory=dict)
    status: Status = "firing"
    key: str | None = Field(None, min_length=1, max_length=MAX_KEY)


class AlertOut(BaseModel):
    """What came of a notification."""

    outcome: str = Field(
        description="opened (a new incident: its run started, or its card proposed), updated "
        "(it fired again), resolved, unchanged (seen before, or nothing open to resolve), "
        "unmatched (no runbook answers it) or refused (its runbook cannot take its params, "
        "or its `auto` start was refused: the incident is then proposed to the chat)"
    )
    message: str
    incident: int | None = None
    runbook_id: str | None = None
    run_id: str | None = Field(None, description="the incident's run, once it is started")
    params: dict[str, str] = Field(
        default_factory=dict, description="exactly the params the incident's run gets"
    )


# -- reading a body into a notice --------------------------------------------------------------


def _fingerprint(labels: Mapping[str, str]) -> str:
    """A stable key of a label set (what Alertmanager's fingerprint is to it)."""
    encoded = json.dumps(dict(sorted(labels.items())), separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def _items(alerts: list[WebhookAlert]) -> tuple[AlertItem, ...]:
    return tuple(
        AlertItem(
            fingerprint=alert.fingerprint or _fingerprint(alert.labels),
            status=alert.status,
            labels=alert.labels,
            annotations=alert.annotations,
            starts_at=alert.startsAt,
            ends_at=alert.endsAt,
        )
        for alert in alerts
    )


def _grouped(
    source: str, key: str, body: AlertmanagerBody | GrafanaBody, status: str
) -> AlertNotice:
    """A grouped notification: the labels all its alerts share (else the first one's)."""
    first = body.alerts[0]
    labels = body.commonLabels or first.labels
    return AlertNotice(
        source=source,
        group_key=key,
        status=status,
        labels=labels,
        annotations=body.commonAnnotations or first.annotations,
        matchers=body.groupLabels or labels,
        alerts=_items(body.alerts),
    )


def alertmanager_notice(body: AlertmanagerBody) -> AlertNotice:
    """An Alertmanager notification, grouped by its groupKey."""
    return _grouped("alertmanager", body.groupKey, body, body.status)


def grafana_notice(body: GrafanaBody) -> AlertNotice:
    """A Grafana notification, grouped by its groupKey (else its first alert's fingerprint)."""
    first = body.alerts[0]
    key = body.groupKey or first.fingerprint or _fingerprint(first.labels)
    return _grouped("grafana", key, body, body.status)


def generic_notice(body: GenericAlert) -> AlertNotice:
    """A generic alert: its name is its `alertname` label; grouped by `key` (else by its
    name and labels)."""
    labels = {**body.labels, "alertname": body.name}
    fingerprint = _fingerprint(labels)
    item = AlertItem(fingerprint, body.status, labels, body.annotations)
    return AlertNotice(
        source="generic",
        group_key=body.key or fingerprint,
        status=body.status,
        labels=labels,
        annotations=body.annotations,
        matchers=labels,
        alerts=(item,),
    )


# -- who sends it ------------------------------------------------------------------------------


async def alert_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Caller:
    """Who a notification comes from: a bearer token as on every guarded route, or basic
    auth whose password is such a token (401 when it is none). Basic auth is not declared as
    a scheme of its own in the OpenAPI document: it is the bearer token, carried otherwise."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return await authorized(request, bearer)
    try:
        _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        password = ""
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=password)
    try:
        return await authorized(request, credentials if password else None)
    except HTTPException as exc:
        # Said in the sender's terms: it sent no bearer token, but a password.
        detail = NO_BASIC_TOKEN if exc.status_code == 401 else exc.detail
        raise HTTPException(exc.status_code, detail, {"WWW-Authenticate": "Basic"}) from None


Sender = Annotated[Caller, Depends(alert_caller)]


# -- the routes --------------------------------------------------------------------------------


def install(app: FastAPI, alerts: AlertService) -> None:
    """Add the alert routes to the API's app."""
    # The token's, the cross-site refusal's, the body limit's, invalid input, too many runs,
    # the store's and a bug's.
    sends = errors(401, 403, 413, 422, 429, 500, 503)

    async def answer(notice: AlertNotice, caller: Caller) -> AlertOut:
        said: AlertAnswer = await alerts.receive(notice, caller.identity)
        return AlertOut(
            outcome=said.outcome,
            message=said.message,
            incident=said.incident_id,
            runbook_id=said.runbook_id,
            run_id=said.run_id,
            params=said.params,
        )

    @app.post("/alerts/alertmanager", status_code=202, responses=sends)
    async def alertmanager_webhook(body: AlertmanagerBody, caller: Sender) -> AlertOut:
        """Prometheus Alertmanager's webhook receiver: one incident per alert group. Takes the
        bearer token, or basic auth with a token as the password (`http_config.basic_auth`)."""
        return await answer(alertmanager_notice(body), caller)

    @app.post("/alerts/grafana", status_code=202, responses=sends)
    async def grafana_webhook(body: GrafanaBody, caller: Sender) -> AlertOut:
        """Grafana's unified alerting webhook contact point: one incident per alert group
        (bearer token, or basic auth with a token as the password)."""
        return await answer(grafana_notice(body), caller)

    @app.post("/alerts", status_code=202, responses=sends)
    async def generic_alert(body: GenericAlert, caller: Sender) -> AlertOut:
        """One alert from anything that can post JSON: one incident per `key` (bearer token,
        or basic auth with a token as the password)."""
        return await answer(generic_notice(body), caller)
