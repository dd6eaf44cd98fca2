"""Alert payloads and settings the alert tests share: an Alertmanager notification as it sends
one, and settings with an incident chat for alert cards."""

from __future__ import annotations

from typing import Any

from agent.settings import Settings
from tests.bot_harness import INCIDENTS

JSON = dict[str, Any]


def alertmanager_body(
    alertname: str = "HighLatency",
    status: str = "firing",
    instances: tuple[str, ...] = ("a",),
    group_key: str | None = None,
    labels: dict[str, str] | None = None,
    starts_at: str = "2026-12-05T05:09:00Z",
    ends_at: str = "0001-01-01T00:00:00Z",
) -> JSON:
    """An Alertmanager `version: "4"` notification of one group, one alert per instance."""
    common = {"alertname": alertname, "service": "checkout-api", **(labels or {})}
    alerts = [
        {
            "status": status,
            "labels": {**common, "instance": instance},
            "annotations": {"summary": f"p99 over 2 s on {instance}"},
            "startsAt": starts_at,
            "endsAt": ends_at,
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": f"fp-{alertname}-{instance}",
        }
        for instance in instances
    ]
    return {
        "version": "4",
        "groupKey": group_key or f'{{}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "loom-ops",
        "groupLabels": {"alertname": alertname},
        "commonLabels": common,
        "commonAnnotations": {"summary": "p99 over 2 s"} if len(instances) > 1 else {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    }


def alert_settings(settings: Settings, **overrides: Any) -> Settings:
    """The test settings with an incident chat for alert cards."""
    return settings.model_copy(update={"alert_chat_id": INCIDENTS, **overrides})
