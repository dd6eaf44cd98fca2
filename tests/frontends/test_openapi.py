"""The OpenAPI document against what the server really sends: every error declared as the JSON
body it is sent with, the event streams as text/event-stream with each event's name and a
payload schema every sent event validates against, the bearer scheme on every operation but
/healthz; and a client generated from the document by a third-party generator
(openapi-python-client) driving a real `loom-ops serve` through start → approve → events."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema
import pytest

from agent.events import EventType
from agent.settings import SecretStr, Settings
from tests.conftest import make_workspace
from tests.http_harness import ServeProcess, free_port, served, sse_events
from tests.support import DISK, LATENCY

ONCALL = "cli:oncall"  # in the group the shipped runbooks name (the tests' people file)
TOKEN = "t0ken-for-tests"
ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
SSE_OPERATIONS = {("post", "/supervise"), ("post", "/runbook"), ("get", "/runs/{run_id}/events")}


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path template, operation) for every operation of the document."""
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def operation_for(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The operation a concrete request path falls under (`/runs/x` → `/runs/{run_id}`)."""
    for template, item in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return dict(item[method.lower()])
    raise AssertionError(f"{method} {path} is not in the document")


def assert_valid(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """`instance` is valid against `schema`, whose $refs point into the document."""
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(instance)


# -- errors -------------------------------------------------------------------------------------


async def test_every_error_response_is_declared_as_the_json_body_it_is_sent_with(
    settings: Settings,
) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    async with served(guarded, headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        spec = (await s.client.get("/openapi.json")).json()
        for method, path, operation in operations(spec):
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (
                        method,
                        path,
                        status,
                    )
        # FastAPI's own 422 shape ({"detail": [...]}) is never sent, so it is not declared.
        assert "HTTPValidationError" not in spec["components"]["schemas"]

        # Errors of text, HTML, SSE and JSON routes alike, as sent: each status is declared
        # for its operation, and the body is JSON valid against the declared schema.
        requests: list[tuple[str, str, dict[str, Any], int]] = [
            ("GET", "/runs/nope/explain", {}, 404),  # a text/plain route
            ("GET", "/runs/nope/trace", {}, 404),  # a text/html route
            ("GET", "/runs/nope/events", {}, 404),  # an event stream
            ("GET", "/runs/nope", {}, 404),
            ("POST", "/runs/nope/approve", {}, 404),
            ("GET", "/runs/-bad-/explain", {}, 422),
            ("GET", "/runs?limit=0", {}, 422),
            ("POST", "/runs", {"json": {}}, 422),
            ("POST", "/supervise", {"json": {"message": ""}}, 422),
            ("GET", "/runs", {"headers": {"Authorization": "Bearer wrong"}}, 401),
            ("GET", "/metrics", {"headers": {"Authorization": ""}}, 401),
            (
                "POST",
                "/runs",
                {
                    "content": b"x" * (settings.max_body_bytes + 1),
                    "headers": {"Content-Type": "application/json"},
                },
                413,
            ),
            # Another site's page: refused before anything reads it (agent.frontends.same_site).
            ("POST", "/runs", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 403),
            ("GET", "/runs", {"headers": {"Host": "rebound.example"}}, 403),
        ]
        for method, path, kwargs, status in requests:
            response = await s.client.request(method, path, **kwargs)
            assert response.status_code == status, (method, path, response.text)
            declared = operation_for(spec, method, path.split("?")[0])["responses"]
            assert str(status) in declared, (method, path, status)
            [(media_type, content)] = declared[str(status)]["content"].items()
            assert response.headers["content-type"].split(";")[0] == media_type, (method, path)
            assert_valid(spec, content["schema"], response.json())
            for header in declared[str(status)].get("headers", {}):  # WWW-Authenticate
                assert header in response.headers, (method, path, header)


# -- event streams ------------------------------------------------------------------------------


async def test_event_streams_declare_every_event_name_and_what_each_carries(
    settings: Settings,
) -> None:
    oncall = settings.model_copy(update={"api_user": ONCALL})
    async with served(oncall) as s:
        spec = (await s.client.get("/openapi.json")).json()
        declared_events: dict[str, Any] = {}
        for method, path in SSE_OPERATIONS:
            ok = spec["paths"][path][method]["responses"]["200"]
            assert set(ok["content"]) == {"text/event-stream"}, (method, path)
            stream = ok["content"]["text/event-stream"]
            assert set(stream["x-events"]) == set(EventType), (method, path)
            for name, event in stream["x-events"].items():
                assert event["description"] and f"`{name}`" in ok["description"]
            declared_events = stream["x-events"]
        events = spec["paths"]["/runs/{run_id}/events"]["get"]["responses"]
        assert "content" not in events["204"]

        # A supervised run through its approval: every event it sends is named as declared,
        # and its `data:` JSON is valid against that name's schema.
        seen: set[str] = set()
        async with s.client.stream(
            "POST", "/supervise", json={"message": LATENCY, "run_id": "inc-1"}
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in sse_events(response):
                assert event.event in declared_events, event.event
                assert_valid(spec, declared_events[event.event]["schema"], event.data)
                with pytest.raises(jsonschema.ValidationError):  # the schemas tell names apart
                    other = "audit" if event.event != "audit" else "run_claimed"
                    assert_valid(spec, declared_events[other]["schema"], event.data)
                seen.add(event.event)
                if event.event == "approval_requested":
                    assert (await s.client.post("/runs/inc-1/approve")).status_code == 200
        assert {
            "run_created",
            "policy_turn",
            "tool_intent",
            "tool_outcome",
            "children_started",
            "approval_requested",
            "approval_decided",
            "audit",
            "run_finished",
        } <= seen


# -- the bearer token ---------------------------------------------------------------------------


async def test_the_bearer_scheme_is_declared_on_exactly_the_operations_that_need_it(
    settings: Settings,
) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    async with served(guarded) as s:
        spec = (
            await s.client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        ).json()
        [(name, scheme)] = spec["components"]["securitySchemes"].items()
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        # Every operation, asked without the token: refused exactly where it is declared.
        checked = 0
        for method, path, operation in operations(spec):
            body = {"message": DISK, "run_id": "r"} if method == "post" else None
            response = await s.client.request(
                method, path.replace("{run_id}", "r"), json=body, timeout=5
            )
            if path == "/healthz":
                assert "security" not in operation and response.status_code == 200
            else:
                assert operation["security"] == [{name: []}], (method, path)
                assert response.status_code == 401, (method, path, response.text)
            checked += 1
        assert checked == 16
        assert await s.service.store.list_runs() == []  # nothing started without the token
        # The document itself is open (README): the API's shape, no data.
        assert (await s.client.get("/openapi.json")).json() == spec


# -- a generated client -------------------------------------------------------------------------

GENERATOR_CONFIG = "package_name_override: loom_ops_client\npost_hooks: []\n"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `loom-ops serve` process with a bearer token, for the module's tests."""
    root = tmp_path_factory.mktemp("serve")
    server = ServeProcess(
        make_workspace(root / "ws"),
        root / "ops.sqlite",
        free_port(),
        LOOM_OPS_API_USER=ONCALL,
        LOOM_OPS_API_TOKEN=TOKEN,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client_package(
    serve: ServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleType]:
    """The Python client openapi-python-client generates from the served document, imported
    (generated once for the module: it takes about a second)."""
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        pytest.skip("openapi-python-client is not installed (it is in the dev extra)")
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_text(httpx.get(f"{serve.url}/openapi.json", timeout=10).text)
    (root / "config.yaml").write_text(GENERATOR_CONFIG)
    done = subprocess.run(
        [
            generator,
            "generate",
            *("--path", str(spec), "--output-path", str(root / "loom_ops_client")),
            *("--meta", "none", "--config", str(root / "config.yaml")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Anything the generator could not express it reports as a warning and leaves out.
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("loom_ops_client")
    finally:
        sys.path.remove(str(root))
        for module in [m for m in sys.modules if m.split(".")[0] == "loom_ops_client"]:
            del sys.modules[module]


def sse_text_events(text: str) -> list[dict[str, Any]]:
    """The events of a whole text/event-stream body (what the generated client returns)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if "data" in fields:
            events.append(fields)
    return events


def test_a_generated_client_starts_approves_and_reads_the_events(
    serve: ServeProcess, client_package: ModuleType
) -> None:
    api = importlib.import_module("loom_ops_client.api.default")
    models = importlib.import_module("loom_ops_client.models")
    start_run, show_run, approve, events = (
        importlib.import_module(f"{api.__name__}.{name}")
        for name in ("start_run", "show_run", "approve", "events")
    )
    spec = httpx.get(f"{serve.url}/openapi.json", timeout=10).json()
    stream = spec["paths"]["/runs/{run_id}/events"]["get"]["responses"]["200"]
    names = stream["content"]["text/event-stream"]["x-events"]

    with client_package.AuthenticatedClient(
        base_url=serve.url, token=TOKEN, raise_on_unexpected_status=True, timeout=10
    ) as client:
        body = models.StartRun(message=DISK, run_id="gen-1", role=models.StartRunRole.RUNBOOK)
        run = start_run.sync(client=client, body=body)
        assert isinstance(run, models.RunOut) and run.run_id == "gen-1", run

        deadline = time.monotonic() + 15
        while not isinstance(
            (run := show_run.sync("gen-1", client=client)).approval, models.ApprovalOut
        ):
            assert time.monotonic() < deadline, run
            time.sleep(0.05)
        assert (
            run.approval.step_id == "vacuum-journal" and "group:approvers" in run.approval.deciders
        )

        decided = approve.sync("gen-1", client=client, body=models.DecisionBody(note="LGTM"))
        assert isinstance(decided, models.DecisionOut), decided
        assert decided.message == f"approved by {ONCALL}"

        while (run := show_run.sync("gen-1", client=client)).status != "succeeded":
            assert time.monotonic() < deadline and run.status in ("running", "queued"), run
            time.sleep(0.05)

        # The events: the whole stream of the ended run, each event parsed by the generated
        # model its name's schema points to, with no field the schema does not declare.
        whole = events.sync_detailed("gen-1", client=client)
        assert whole.status_code == 200 and isinstance(whole.parsed, str)
        sent = sse_text_events(whole.parsed)
        kinds = [e["event"] for e in sent]
        assert kinds[0] == "run_created" and kinds[-1] == "run_finished"
        assert kinds.index("approval_requested") < kinds.index("approval_decided")
        for event in sent:
            model = getattr(models, names[event["event"]]["schema"]["$ref"].rsplit("/", 1)[1])
            parsed = model.from_dict(json.loads(event["data"]))
            assert str(parsed.seq) == event["id"] and parsed.type_ == event["event"]
            assert parsed.data.additional_properties == {}, event
        finished = json.loads(sent[-1]["data"])
        assert finished["data"]["status"] == "succeeded"

        # Resuming after the last event of an ended run: 204, which the client knows.
        again = events.sync_detailed("gen-1", client=client, last_event_id=sent[-1]["id"])
        assert again.status_code == 204 and again.parsed is None and again.content == b""


def test_a_generated_client_reads_every_error_as_its_declared_json(
    serve: ServeProcess, client_package: ModuleType
) -> None:
    """The generated client parses errors by the document: before, `explain`'s 404 was
    declared as text and the client crashed on the JSON body it got."""
    models = importlib.import_module("loom_ops_client.models")
    api = "loom_ops_client.api.default"
    explain, trace, events, show_run = (
        importlib.import_module(f"{api}.{name}")
        for name in ("explain", "trace", "events", "show_run")
    )
    with client_package.AuthenticatedClient(base_url=serve.url, token=TOKEN, timeout=10) as client:
        for operation in (explain, trace, events, show_run):
            missing = operation.sync_detailed("nope", client=client)
            assert missing.status_code == 404, operation.__name__
            assert isinstance(missing.parsed, models.ErrorOut), (operation.__name__, missing)
            assert "nope" in missing.parsed.error
    with client_package.AuthenticatedClient(base_url=serve.url, token="wrong") as client:
        refused = show_run.sync_detailed("nope", client=client)
        assert refused.status_code == 401 and isinstance(refused.parsed, models.ErrorOut)
        assert refused.parsed.error == "missing or wrong bearer token"


def test_the_readme_documents_every_stream_event_name() -> None:
    """The README's table of stream events names exactly the events a stream can send."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The HTTP API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(EventType)
    assert "204" in section and "Last-Event-ID" in section and "addEventListener" in section
