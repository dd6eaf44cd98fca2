"""What the bot says, as Telegram HTML: approval requests, decisions, progress, summaries.

Every value is escaped by Jinja2's autoescape or markupsafe; only the tags written here are
markup, so a command's output with `<`, `>` or `&` cannot break a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jinja2
from markupsafe import Markup, escape

from agent.records import ApprovalRecord, ApprovalStatus, RunRecord, RunStatus

# Telegram's limit on one message's text.
MAX_MESSAGE_CHARS = 4096
# More chunks than this and a text goes as a file: a wall of messages helps nobody at 3 a.m.
MAX_CHUNKS = 3
# callback_data is `ap:<token>:<choice>`; the token alone names the request in the database.
CALLBACK_PREFIX = "ap"
CHOICES = {"y": "approve", "s": "skip", "n": "reject"}

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("bot", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

STATUS_ICONS = {
    RunStatus.QUEUED: "⏳",
    RunStatus.RUNNING: "⚙️",
    RunStatus.WAITING_APPROVAL: "🛑",
    RunStatus.WAITING_CHILDREN: "⚙️",
    RunStatus.SUCCEEDED: "✅",
    RunStatus.FAILED: "💥",
    RunStatus.REJECTED: "❌",
    RunStatus.CANCELLED: "🚫",
    RunStatus.EXPIRED: "⌛",
}

Who = Callable[[str], str]


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: a message must fit Telegram's 4096 (the full text is in
    /explain and the trace)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def hhmm(ts: float) -> str:
    """A time as people read it in a chat: `14:03 UTC`."""
    return time.strftime("%H:%M UTC", time.gmtime(ts))


def callback_data(token: str, choice: str) -> str:
    """The opaque payload of a button: at most 64 bytes, meaningless without the database."""
    data = f"{CALLBACK_PREFIX}:{token}:{choice}"
    assert len(data.encode()) <= 64 and choice in CHOICES
    return data


def parse_callback_data(data: str) -> tuple[str, str] | None:
    """(token, choice) of a button's payload, or None for anything we did not send."""
    prefix, _, rest = data.partition(":")
    token, _, choice = rest.rpartition(":")
    if prefix != CALLBACK_PREFIX or not token or choice not in CHOICES or len(token) > 40:
        return None
    return token, choice


def decision_line(approval: ApprovalRecord, who: Who) -> str:
    """How a decided request ends its message: who decided what, and when (HTML)."""
    at = hhmm(approval.decided_at or time.time())
    by = who(approval.decided_by) if approval.decided_by else ""
    if approval.status == ApprovalStatus.APPROVED:
        verb = "Run again, approved" if approval.kind == "in_doubt" else "Approved"
        line = Markup("✅ <b>{} by {}</b> at {}").format(verb, by, at)
    elif approval.status == ApprovalStatus.SKIPPED:
        line = Markup("⏭ <b>Skipped by {}</b> at {} (treated as done)").format(by, at)
    elif approval.status == ApprovalStatus.REJECTED:
        line = Markup("❌ <b>Rejected by {}</b> at {}").format(by, at)
    elif approval.status == ApprovalStatus.EXPIRED:
        line = Markup("⌛ <b>Expired</b> at {} without a decision").format(at)
    elif approval.status == ApprovalStatus.CANCELLED:
        line = Markup("🚫 <b>Cancelled</b> with the run by {} at {}").format(by, at)
    else:
        return ""
    if approval.note:
        line += Markup(" — {}").format(approval.note)
    return str(line)


def approval_text(
    approval: ApprovalRecord,
    root_id: str,
    runbook_id: str | None,
    requested_by: str,
    who: Who,
) -> str:
    """The approval message: run, runbook, step, exact action, why, rollback, who, deadline;
    once decided, the decision line ends it."""
    decided = approval.status != ApprovalStatus.PENDING
    return _ENV.get_template("approval.html.j2").render(
        a=approval,
        action=clip(approval.action, 1500),
        reason=clip(approval.reason, 500),
        rollback=clip(approval.rollback, 800) if approval.rollback else None,
        root_id=root_id,
        runbook_id=runbook_id,
        requested_by=requested_by,
        approvers=", ".join(who(d) for d in approval.deciders) or "any approver",
        who=who,
        clock=lambda ts: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)),
        outcome=Markup(decision_line(approval, who)) if decided else "",
    )


def approval_buttons(approval: ApprovalRecord) -> list[list[tuple[str, str]]]:
    """(label, callback_data) rows of an open request's keyboard."""
    token = approval.token
    if approval.kind == "in_doubt":
        return [
            [("🔁 Run again", callback_data(token, "y")), ("⏭ Skip", callback_data(token, "s"))],
            [("❌ Abort", callback_data(token, "n"))],
        ]
    return [[("✅ Approve", callback_data(token, "y")), ("❌ Reject", callback_data(token, "n"))]]


@dataclass(frozen=True)
class LastStep:
    """The latest step outcome a progress message shows."""

    run_id: str
    role: str
    tool: str
    step_id: str | None
    status: str


def progress_text(
    root: RunRecord, last: LastStep | None, waiting: str | None, who: Who, now: float
) -> str:
    """The run's one progress message, rendered from where the run stands now."""
    end = root.finished_at or now
    request = root.request if len(root.request) <= 300 else root.request[:299] + "…"
    return _ENV.get_template("progress.html.j2").render(
        run=root,
        icon=STATUS_ICONS[root.status],
        request=request,
        who=who,
        elapsed=_elapsed(end - root.created_at),
        last=last,
        waiting=waiting,
    )


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60} s"


def run_line(run: RunRecord, now: float) -> str:
    """One run in a list (HTML)."""
    return str(
        Markup("{} <code>{}</code> {}{} · {} ago").format(
            STATUS_ICONS[run.status],
            run.id,
            run.status,
            Markup(" · <code>{}</code>").format(run.runbook_id) if run.runbook_id else "",
            _elapsed(now - run.created_at),
        )
    )


def telegram_length(text: str) -> int:
    """A text's length as Telegram counts it: UTF-16 code units (an emoji counts two)."""
    return len(text.encode("utf-16-le")) // 2


def pre_chunks(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Plain text as `<pre>` messages, split at line boundaries, each within `limit` (the
    limit applies to the text Telegram shows, so the tags and escapes do not count)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines():
        while telegram_length(line) > limit - 1:  # one huge line: cut it
            line = line[: max(1, len(line) * (limit - 1) // telegram_length(line) - 1)]
        length = telegram_length(line) + 1
        if current and size + length > limit:
            chunks.append("<pre>" + "\n".join(current) + "</pre>")
            current, size = [], 0
        current.append(str(escape(line)))
        size += length
    if current:
        chunks.append("<pre>" + "\n".join(current) + "</pre>")
    return chunks


def html_chunks(html: str, limit: int = MAX_MESSAGE_CHARS) -> list[str] | None:
    """HTML whose tags never span lines, split at line boundaries into messages whose raw
    text stays within `limit` UTF-16 units (more than Telegram's count after parsing, so
    safe); None when one line alone is too long (send it as a file instead)."""
    chunks: list[str] = []
    current = ""
    for line in html.splitlines(keepends=True):
        if telegram_length(line) > limit:
            return None
        if telegram_length(current) + telegram_length(line) > limit:
            chunks.append(current)
            current = ""
        current += line
    if current.strip():
        chunks.append(current)
    return [chunk.strip("\n") for chunk in chunks if chunk.strip()]
