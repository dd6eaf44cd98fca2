"""The zero-credential sandbox: the real bot, pointed at the local Bot API stand-in, and a chat
page in the browser where people play the incident chat (`loom-ops sandbox`).

No Telegram token, no API key, nothing leaves 127.0.0.1. The page talks to the stand-in the
way a Telegram client would: it sends messages and button taps as users, and watches the
chat live over Server-Sent Events. `--script incident` plays the flow by itself through the
same page-facing API and prints the transcript.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from agent.errors import ServingRefused
from agent.frontends.same_site import SameSiteOnly, server_names
from agent.http_server import HttpServer
from agent.records import record
from agent.service.runs import RunService
from agent.settings import Settings
from bot.gateway import serve_bot
from bot.handlers import COMMANDS
from bot.settings import TelegramSettings
from bot.standin import BotApiStandIn, build_app
from bot.store import ChatStore

TOKEN = "100000000:SANDBOX-local-only-not-a-real-telegram-token"
INCIDENT_CHAT = -100777
DEFAULT_PORT = 8780


@record
class Person:
    """Someone in the sandbox's chats."""

    user_id: int
    name: str
    username: str
    role: str


# The people of the shipped example people file (people.example.yaml): Alex is on call, Sam
# is in group:approvers, which the shipped runbooks name.
PEOPLE = (
    Person(200000001, "Alex", "alex", "on call (starts runs; not an approver)"),
    Person(100000001, "Sam", "sam", "approver"),
)
REQUESTER, APPROVER = PEOPLE


EXAMPLE_PEOPLE = Path(__file__).resolve().parents[2] / "people.example.yaml"


def service_settings(settings: Settings) -> Settings:
    """The sandbox's people: the shipped example people file and Sam as the one Telegram
    approver; the real TELEGRAM_APPROVER_IDS, LOOM_OPS_APPROVERS (which would narrow who may
    decide) and people file are ignored here."""
    update: dict[str, object] = {"telegram_approvers": [str(APPROVER.user_id)], "approvers": []}
    if EXAMPLE_PEOPLE.exists():  # an installed package has no repository around it
        update["people_file"] = EXAMPLE_PEOPLE
    return settings.model_copy(update=update)


def make_standin() -> BotApiStandIn:
    """The stand-in with the sandbox's people, the incident group, and each person's
    private chat with the bot."""
    # A sandbox started again on the same database gets a fresh stand-in, whose update ids
    # start from 1 again (the bot's dedup tells those apart by content). Message ids move on
    # as Telegram's do, by the clock: a chat's message never repeats an earlier session's.
    first_message_id = int(time.time() * 1000) % 2**31 + 1
    standin = BotApiStandIn(
        TOKEN, bot_username="loom_ops_sandbox_bot", first_message_id=first_message_id
    )
    for person in PEOPLE:
        standin.add_user(person.user_id, person.name, person.username)
        standin.add_chat(person.user_id, "private")
    standin.add_chat(INCIDENT_CHAT, "supergroup", "#incident (sandbox)")
    return standin


def telegram_settings(base_url: str) -> TelegramSettings:
    """The sandbox's own bot settings; real TELEGRAM_* settings are ignored here (every
    field is given, so none is read from the environment: a webhook URL there would take
    the sandbox's bot off its page)."""
    chosen = {
        "allowed_chat_ids": [INCIDENT_CHAT, *(p.user_id for p in PEOPLE)],
        "approver_ids": [APPROVER.user_id],
        "api_base_url": base_url,
        "group_rate": 0,  # nothing to protect: the stand-in has no flood limit
        "overall_rate": 0,
        "progress_interval": 1.0,
        "poll_timeout": 10,
    }
    fields = TelegramSettings.model_fields
    defaults = {name: field.default_value() for name, field in fields.items()}
    return TelegramSettings(_env_file=None, **(defaults | chosen))


def build_sandbox_app(standin: BotApiStandIn) -> Starlette:
    """The page, its API under /sandbox/, and the stand-in's Bot API beside them."""
    routes = [
        Route("/", _page),
        Route("/sandbox/static/{name}", _static),
        Route("/sandbox/state", _state),
        Route("/sandbox/events", _events),
        Route("/sandbox/say", _say, methods=["POST"]),
        Route("/sandbox/tap", _tap, methods=["POST"]),
        Route("/sandbox/documents/{file_id}", _document),
        Mount("/", app=build_app(standin)),
    ]
    # Only this machine's own page may drive it: loopback names, its own origin, JSON posts
    # to the page's API (the Bot API beside it takes python-telegram-bot's form posts).
    local = Middleware(SameSiteOnly, names=server_names("127.0.0.1"), json_posts_under="/sandbox/")
    app = Starlette(routes=routes, middleware=[local])
    app.state.standin = standin
    return app


# -- the page and its API --------------------------------------------------------------------

STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("bot.sandbox_page").joinpath(name).read_text(encoding="utf-8")


async def _page(request: Request) -> HTMLResponse:
    return HTMLResponse(_asset("index.html"))


async def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_TYPES:
        return JSONResponse({"error": "no such file"}, 404)
    return Response(_asset(name), media_type=STATIC_TYPES[name])


def _standin(request: Request) -> BotApiStandIn:
    standin: BotApiStandIn = request.app.state.standin
    return standin


async def _state(request: Request) -> JSONResponse:
    """Everything the page shows: people, chats and their messages, the bot's commands."""
    standin = _standin(request)
    chats = []
    for chat in standin.chats():
        chats.append({**chat, "messages": standin.messages(chat["id"])})
    commands = standin.commands() or [
        {"command": c.command, "description": c.description} for c in COMMANDS
    ]
    return JSONResponse(
        {
            "sandbox": True,
            "bot": standin.bot_user,
            "people": [p.__dict__ for p in PEOPLE],
            "chats": chats,
            "commands": commands,
        }
    )


async def _events(request: Request) -> EventSourceResponse:
    """New and edited messages and button answers, live."""
    standin = _standin(request)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        queue = standin.subscribe()
        try:
            while True:
                event = await queue.get()
                yield ServerSentEvent(data=json.dumps(event, ensure_ascii=False))
        finally:
            standin.unsubscribe(queue)

    return EventSourceResponse(stream(), ping=15)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


async def _say(request: Request) -> JSONResponse:
    """A person sends a message (a reply when `reply_to_message_id` is given)."""
    try:
        body = await _body(request)
        message = _standin(request).inject_message(
            int(body["chat_id"]),
            int(body["user_id"]),
            str(body["text"]),
            reply_to_message_id=body.get("reply_to_message_id"),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return JSONResponse({"error": f"cannot send that: {exc}"}, 400)
    return JSONResponse(message)


async def _tap(request: Request) -> JSONResponse:
    """A person taps an inline button; the bot's answer arrives as a `callback_answer` event."""
    try:
        body = await _body(request)
        query_id = _standin(request).inject_callback(
            int(body["chat_id"]), int(body["message_id"]), int(body["user_id"]), str(body["data"])
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return JSONResponse({"error": f"cannot tap that: {exc}"}, 400)
    return JSONResponse({"callback_query_id": query_id})


async def _document(request: Request) -> Response:
    """A document the bot sent (the HTML trace, a long summary), as a download."""
    standin = _standin(request)
    file_id = request.path_params["file_id"]
    try:
        content = standin.document_bytes(file_id)
    except KeyError:
        return JSONResponse({"error": "no such document"}, 404)
    name = request.query_params.get("name", "document")
    # ASCII only: a header is Latin-1, and this keeps it free of quotes and line breaks.
    safe = "".join(ch for ch in name if ch.isascii() and (ch.isalnum() or ch in "._-"))
    safe = safe or "document"
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{safe}"'},
    )


# -- running it ------------------------------------------------------------------------------


@record
class RunningSandbox:
    """A sandbox being served: its stand-in, its page's URL, and the bot's RunService."""

    standin: BotApiStandIn
    url: str
    service: RunService


@asynccontextmanager
async def running_sandbox(
    settings: Settings, port: int = DEFAULT_PORT
) -> AsyncIterator[RunningSandbox]:
    """Serve the stand-in and the page on 127.0.0.1 and run the bot against them for the
    block (ServingRefused when the port is taken)."""
    standin = make_standin()
    server = HttpServer(
        build_sandbox_app(standin), "127.0.0.1", port, before_stop=standin.release_long_polls
    )
    try:
        await server.start()
    except (OSError, OverflowError) as exc:
        raise ServingRefused(f"cannot serve the sandbox on port {port}: {exc}") from None
    service = await RunService.open(service_settings(settings))
    service.prepare()
    # The page's chat starts empty: an earlier session's unsent progress edits would land in
    # it as messages about runs nobody here has seen.
    await ChatStore(service.database).drop_stale_progress(before=time.time())
    stop, ready = asyncio.Event(), asyncio.Event()
    bot = asyncio.create_task(
        serve_bot(service, TOKEN, telegram_settings(f"{server.url}/bot"), stop, ready)
    )
    try:
        await _until_ready(ready, bot)
        yield RunningSandbox(standin, server.url, service)
    finally:
        stop.set()
        await bot
        await server.stop()
        await service.close()


async def run_sandbox(
    settings: Settings, port: int = DEFAULT_PORT, script: str | None = None
) -> int:
    """Serve the sandbox until interrupted, or play `script` through it; the exit code."""
    async with running_sandbox(settings, port) as sandbox:
        if script is not None:
            return await play_incident(sandbox.url)
        print(f"loom-ops sandbox: open {sandbox.url}  (Ctrl-C stops it)", flush=True)
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopped.set)
        await stopped.wait()
        return 0


async def _until_ready(ready: asyncio.Event, bot: asyncio.Task[None]) -> None:
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait([waiting, bot], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if bot.done():
        bot.result()  # raises what stopped the bot
    if not ready.is_set():
        waiting.cancel()
        raise RuntimeError("the sandbox bot did not start within 30 s")


async def play_incident(url: str, timeout: float = 60) -> int:
    """The incident flow through the page-facing API: Alex sends /run, Sam taps Approve, the
    summary arrives. Prints the transcript; 0 only when the run succeeded."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as page:
        flow = ScriptedChat(page, timeout)
        try:
            succeeded = await flow.play()
        except TimeoutError as exc:
            await flow.print_transcript()
            print(f"sandbox: the incident flow did NOT finish: {exc}")
            return 1
        await flow.print_transcript()
        print("sandbox: the incident flow " + ("succeeded" if succeeded else "did NOT succeed"))
        return 0 if succeeded else 1


class ScriptedChat:
    """The incident chat as the page sees it, played by a script."""

    def __init__(self, page: httpx.AsyncClient, timeout: float) -> None:
        self._page = page
        self._timeout = timeout

    async def messages(self) -> list[dict[str, Any]]:
        """The incident chat's messages now."""
        state = (await self._page.get("/sandbox/state")).json()
        chat = next(c for c in state["chats"] if c["id"] == INCIDENT_CHAT)
        messages: list[dict[str, Any]] = chat["messages"]
        return messages

    async def until(self, predicate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """The first message that satisfies `predicate`, waiting for it up to the timeout."""
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            for message in await self.messages():
                if predicate(message):
                    return message
            await asyncio.sleep(0.1)
        raise TimeoutError(f"nothing showed up in the incident chat within {self._timeout:g} s")

    async def say(self, person: Person, text: str) -> dict[str, Any]:
        """`person` sends `text` to the incident chat; the message as stored."""
        said = await self._page.post(
            "/sandbox/say",
            json={"chat_id": INCIDENT_CHAT, "user_id": person.user_id, "text": text},
        )
        said.raise_for_status()
        message: dict[str, Any] = said.json()
        return message

    async def tap(self, person: Person, message: dict[str, Any], data: str) -> None:
        """`person` taps the button of `message` that carries `data`."""
        tapped = await self._page.post(
            "/sandbox/tap",
            json={
                "chat_id": INCIDENT_CHAT,
                "message_id": message["message_id"],
                "user_id": person.user_id,
                "data": data,
            },
        )
        tapped.raise_for_status()

    async def play(self) -> bool:
        """/run as Alex, ▶ Start as Alex, Approve as Sam, wait for the summary; True if the
        run succeeded."""
        asked = await self.say(REQUESTER, "/run incident: API latency spike")
        card = await self.until(
            lambda m: (
                _buttons(m)
                and (m.get("reply_to_message") or {}).get("message_id") == asked["message_id"]
            )
        )
        start = next(d for d in _buttons(card) if d.startswith("rs:") and not d.endswith(":x"))
        await self.tap(REQUESTER, card, start)
        # The card names the run it started: only that run's messages count (a restarted
        # sandbox may first deliver what an earlier session's runs still had to say).
        started = await self.until(
            lambda m: m["message_id"] == card["message_id"] and "▶ Started" in m.get("text", "")
        )
        run_id = started["text"].rsplit("run ", 1)[1].rstrip(".")
        request = await self.until(
            lambda m: _buttons(m) and f"Run: {run_id}\n" in m.get("text", "")
        )
        approve = next(d for d in _buttons(request) if d.endswith(":y"))
        await self.tap(APPROVER, request, approve)
        summary = await self.until(
            lambda m: m.get("text", "").startswith(f"Run {run_id}:") and "Requested:" in m["text"]
        )
        await self.until(lambda m: m["message_id"] == request["message_id"] and not _buttons(m))
        return "SUCCEEDED" in summary["text"].splitlines()[0]

    async def print_transcript(self) -> None:
        """Every message of the incident chat, who said it, in order."""
        for message in await self.messages():
            who = message.get("from", {}).get("first_name", "?")
            print(f"--- {who}:\n{message.get('text', '')}\n")


def _buttons(message: dict[str, Any]) -> list[str]:
    markup = message.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]
