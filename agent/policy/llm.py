"""The LLM policy: any OpenAI-compatible chat-completions API through the official `openai` client.

It only proposes tool calls; the kernel journals each answer before using it, so a resume never
asks the model again for a turn it already answered. Retries and timeouts are the client's own.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import PolicyMisconfigured, PolicyUnavailable
from agent.policy.base import (
    FinalAnswer,
    Observation,
    PolicyContext,
    PolicyDecision,
    ToolCall,
)
from agent.redaction import Redactor
from agent.settings import Settings
from agent.tools.toolbox import TOOL_SPECS

FINISH_TOOL = "finish_run"
MAX_RESULT_CHARS = 8000  # one tool result as the model sees it; the journal keeps it whole
MAX_SERVER_MESSAGE = 300  # of an error body quoted in a run's one-line error

# How servers say "no such model" (OpenAI, vLLM, Ollama, LiteLLM, OpenRouter...): the 400/404 is
# then about OPENAI_MODEL, not about the URL or the request.
_MODEL_MISSING = re.compile(
    r"\bmodel\b.{0,120}?(?:not found|does not exist|doesn't exist|not exist)"
    r"|\b(?:invalid|unknown|no such)\s+model\b|\bnot a valid model\b",
    re.IGNORECASE,
)

_PROMPTS = jinja2.Environment(
    loader=jinja2.PackageLoader("agent.policy", "prompts"),
    autoescape=False,  # plain text for a model, not HTML
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class FinishRunArgs(BaseModel):
    """End the run: the outcome and a short summary for the humans."""

    model_config = ConfigDict(extra="forbid")

    outcome: str = Field(pattern="^(succeeded|failed)$")
    summary: str = Field(min_length=1, max_length=2000)


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """OpenAI tool definitions, with JSON schemas generated from each tool's argument model."""
    specs = [(name, TOOL_SPECS[name].description, TOOL_SPECS[name].args_model) for name in names]
    specs.append((FINISH_TOOL, "End the run with its outcome and a summary.", FinishRunArgs))
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": model.model_json_schema(),
            },
        }
        for name, description, model in specs
    ]


def _turn_of(call_key: str) -> str:
    return call_key.rsplit("#", 1)[-1].split(".", 1)[0]


def _history_messages(history: list[Observation] | tuple[Observation, ...]) -> list[dict[str, Any]]:
    """Replay the run as the model saw it: each turn's calls, then each call's result."""
    messages: list[dict[str, Any]] = []
    index = 0
    while index < len(history):
        turn = _turn_of(history[index].call_key)
        group = []
        while index < len(history) and _turn_of(history[index].call_key) == turn:
            group.append(history[index])
            index += 1
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": obs.call_key,
                        "type": "function",
                        "function": {"name": obs.tool, "arguments": json.dumps(obs.args)},
                    }
                    for obs in group
                ],
            }
        )
        for obs in group:
            result = json.dumps({"status": obs.status, **obs.outcome}, ensure_ascii=False)
            if len(result) > MAX_RESULT_CHARS:
                result = result[:MAX_RESULT_CHARS] + " …(truncated)"
            messages.append({"role": "tool", "tool_call_id": obs.call_key, "content": result})
    return messages


class OpenAIPolicy:
    """Asks the model for the next tool calls of a run."""

    def __init__(
        self, settings: Settings, redactor: Redactor, client: AsyncOpenAI | None = None
    ) -> None:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        if not key:
            raise ValueError(
                "no LLM configured: set OPENAI_API_KEY (any value for a local server such as "
                "Ollama) or pass --mock-llm"
            )
        self.name = f"openai:{settings.openai_model}"
        self._model = settings.openai_model
        self._redactor = redactor
        self._client = client or AsyncOpenAI(
            api_key=key,
            base_url=settings.openai_base_url,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
        )

    def preflight(self, request: str, catalog: object) -> None:
        """Nothing to check before the run: the model reads the request itself."""

    def messages(self, context: PolicyContext) -> list[dict[str, Any]]:
        """The conversation sent for this turn, redacted: the role's instructions as the
        system message, the incident (request, runbook, memory) as the first user message,
        then the turns so far. Some models' chat templates refuse a chat with no user turn."""
        instructions = _PROMPTS.get_template(f"prompt_{context.role}.j2").render()
        incident = _PROMPTS.get_template("prompt_context.j2").render(
            request=context.request,
            runbook=context.runbook,
            params=context.params,
            catalog=[] if context.runbook else list(context.catalog.runbooks.values()),
            memory=list(context.memory),
        )
        messages = [
            {"role": "system", "content": instructions},
            {"role": "user", "content": incident},
            *_history_messages(context.history),
        ]
        return self._redactor.data(messages)

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """One chat completion; tool calls become the decision, finish_run the final answer."""
        messages = self.messages(context)
        try:
            response = await self._client.chat.completions.create(
                model=self._model,
                messages=messages,  # type: ignore[arg-type]
                tools=tool_schemas(list(context.tools)),  # type: ignore[arg-type]
                tool_choice="auto",
            )
        except (
            openai.BadRequestError,
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.UnprocessableEntityError,
        ) as exc:
            # The client never retries these, and neither should a worker: no amount of waiting
            # fixes a wrong key, URL or model, so the run fails now, naming what to fix.
            raise PolicyMisconfigured(self._misconfiguration(exc)) from exc
        except openai.APIError as exc:  # after the client's own retries: an outage, resumable
            raise PolicyUnavailable(f"LLM request failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(response, ChatCompletion):
            # A 200 that is no chat completion (a web UI's index page, say): the URL names
            # something else than an OpenAI-compatible API, and waiting will not change that.
            base = str(self._client.base_url).rstrip("/")
            raise PolicyMisconfigured(
                f"LLM misconfigured: check OPENAI_BASE_URL, {base} answered with something "
                f"that is not a chat completion ({type(response).__name__}); "
                "OpenAI-compatible servers usually end in /v1"
            )
        if not response.choices:
            raise PolicyUnavailable("LLM answered with no choices")
        message = response.choices[0].message
        usage = response.usage
        decision = PolicyDecision(
            thought=message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            prompt_excerpt=_excerpt(messages),
        )
        for call in message.tool_calls or []:
            function = getattr(call, "function", None)
            if function is None:
                continue
            args = _parse_arguments(function.arguments)
            if function.name == FINISH_TOOL:
                try:
                    finish = FinishRunArgs.model_validate(args)
                except ValidationError:
                    # Not a valid ending: let the kernel refuse it like any bad call.
                    decision.calls.append(ToolCall(name=FINISH_TOOL, args=args))
                    continue
                decision.final = FinalAnswer(outcome=finish.outcome, summary=finish.summary)  # type: ignore[arg-type]
                break
            decision.calls.append(ToolCall(name=function.name, args=args))
        if decision.calls and decision.final is not None:
            # The model cannot judge calls whose results it has not seen: it finishes next turn.
            decision.final = None
        if not decision.calls and decision.final is None:
            text = (message.content or "").strip() or "(no text)"
            decision.final = FinalAnswer(
                outcome="failed", summary=f"the model stopped without finish_run: {text[:500]}"
            )
        return decision

    def _misconfiguration(self, exc: openai.APIStatusError) -> str:
        """One redacted line for a 400/401/403/404/422 answer, naming the setting to fix."""
        status = exc.status_code
        said = _server_message(exc)
        asked = f"{exc.request.method} {exc.request.url}"
        # "OPENAI_API_KEY: x" would read as a secret to the redactor: no ":" or "=" after a name.
        if status in (401, 403):
            line = f"LLM misconfigured: check OPENAI_API_KEY (HTTP {status} for {asked}: {said})"
        elif exc.code == "model_not_found" or _MODEL_MISSING.search(said):
            line = (
                f"LLM misconfigured: check OPENAI_MODEL, the server has no model "
                f"{self._model!r} (HTTP {status}: {said})"
            )
        elif status == 404:
            base = str(self._client.base_url).rstrip("/")
            hint = (
                "is it an OpenAI-compatible server?"
                if base.endswith("/v1")
                else "OpenAI-compatible servers usually end in /v1"
            )
            line = (
                f"LLM misconfigured: check OPENAI_BASE_URL, {asked} answered HTTP 404 "
                f"(OPENAI_BASE_URL is {base}; {hint})"
            )
        else:
            line = f"LLM rejected the request (HTTP {status} for {asked}): {said}"
        return self._redactor.text(line)


def _server_message(exc: openai.APIStatusError) -> str:
    """What the server said, on one bounded line: the error body's message if it has one."""
    body = exc.body
    if isinstance(body, dict):
        # {"error": {"message": ...}} arrives unwrapped; vLLM and FastAPI put it at the top.
        text = body.get("message") or body.get("detail") or json.dumps(body)
    elif body is None or body == "":
        text = exc.response.reason_phrase or "no message"
    else:
        text = str(body)
    text = " ".join(str(text).split())
    if len(text) > MAX_SERVER_MESSAGE:
        text = text[:MAX_SERVER_MESSAGE] + "…"
    return text


def _parse_arguments(raw: str | None) -> dict[str, Any]:
    """Tool-call arguments as a dict; anything malformed is passed on for the kernel to refuse."""
    try:
        parsed = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {"_malformed_arguments": (raw or "")[:500]}
    return parsed if isinstance(parsed, dict) else {"_malformed_arguments": str(raw)[:500]}


def _excerpt(messages: list[dict[str, Any]], limit: int = 400) -> str:
    """The end of the conversation sent (already redacted): what the model answered to."""
    last = messages[-1]
    text = last.get("content") or json.dumps(last.get("tool_calls") or "")
    return f"{last['role']}: {text[-limit:]}"
