"""A local OpenAI-compatible chat-completions server for tests: answers from a script.

Each scripted item is either a reply (tool calls or text, HTTP 200) or an HTTP error (e.g. 429
with `retry-after-ms`, 500, or a 4xx with the server's error message and code). Every request
body is kept so tests can count and inspect them. It serves `/v1/chat/completions` only: any
other path answers 404 like a real server, and is counted in `paths` too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def tool_reply(*calls: tuple[str, dict[str, Any] | str]) -> dict[str, Any]:
    """A 200 answer calling tools; a str argument is sent as is (to test malformed JSON)."""
    return {
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
            for i, (name, args) in enumerate(calls)
        ]
    }


CHAT_PATH = "/v1/chat/completions"


def http_error(
    status: int,
    retry_after_ms: int | None = None,
    message: str = "scripted failure",
    code: str | None = None,
) -> dict[str, Any]:
    """An error answer with an OpenAI-style body (`{"error": {"message", "code"}}`); the openai
    client retries 429 and 5xx by itself, never 400/401/403/404."""
    return {"status": status, "retry_after_ms": retry_after_ms, "message": message, "code": code}


@dataclass
class StandIn:
    """The script, what was asked, and the base URL to point OPENAI_BASE_URL at."""

    script: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # every POST, whichever path it asked for
    base_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_item(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record a chat-completions request and pop its scripted answer (500 once it is out)."""
        with self.lock:
            self.requests.append(body)
            if not self.script:
                return http_error(500)
            return self.script.pop(0)


def html_page(text: str = "<html><body>Open WebUI</body></html>") -> dict[str, Any]:
    """A 200 answer that is no chat completion: what a web UI at the configured URL sends."""
    return {"page": text}


def _handler(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            with stand_in.lock:
                stand_in.paths.append(self.path)
            if self.path != CHAT_PATH:
                # What e.g. Ollama answers for a path it does not serve (OPENAI_BASE_URL without
                # /v1): plain text, no JSON body.
                payload = b"404 page not found"
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            body = json.loads(raw or b"{}")
            item = stand_in.next_item(body)
            if "page" in item:
                page = item["page"].encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if "status" in item:
                error = {
                    "message": item.get("message", "scripted failure"),
                    "code": item.get("code"),
                }
                payload = json.dumps({"error": error}).encode()
                self.send_response(item["status"])
                if item.get("retry_after_ms") is not None:
                    self.send_header("retry-after-ms", str(item["retry_after_ms"]))
            else:
                message = {"role": "assistant", "content": item.get("content")}
                if item.get("tool_calls"):
                    message["tool_calls"] = item["tool_calls"]
                payload = json.dumps(
                    {
                        "id": f"chatcmpl-{len(stand_in.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "stand-in"),
                        "choices": [
                            {
                                "index": 0,
                                "message": message,
                                "finish_reason": "tool_calls" if item.get("tool_calls") else "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": 100,
                            "completion_tokens": 20,
                            "total_tokens": 120,
                        },
                    }
                ).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            return

    return Handler


@contextmanager
def serve(script: list[dict[str, Any]]) -> Iterator[StandIn]:
    """Run the stand-in on a free 127.0.0.1 port for the duration of the block."""
    stand_in = StandIn(list(script))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    stand_in.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        httpd.shutdown()
        httpd.server_close()
