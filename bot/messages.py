"""What the bot says, as Telegram HTML: approval requests, decisions, progress, summaries.

Every value is escaped by Jinja2's autoescape or markupsafe; only the tags written here are
markup, so a command's output with `<`, `>` or `&` cannot break a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from markupsafe import Markup

from agent.records import (
    CHAT_IDENTITY,
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
    RunRecord,
    RunStatus,
    record,
)
from agent.views.jinja import environment

# Telegram's limit on one message's text.
MAX_MESSAGE_CHARS = 4096
# More chunks than this and a text goes as a file: a wall of messages helps nobody at 3 a.m.
MAX_CHUNKS = 3
# callback_data is `ap:<token>:<choice>`; the token alone names the request in the database.
CALLBACK_PREFIX = "ap"
CHOICES = {"y": "approve", "s": "skip", "n": "reject"}

_ENV = environment("bot", html=True)

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

# What people read for a status: no kernel words (`waiting_children`) in a chat.
STATUS_WORDS = {
    RunStatus.QUEUED: "queued",
    RunStatus.RUNNING: "running",
    RunStatus.WAITING_APPROVAL: "waiting for approval",
    RunStatus.WAITING_CHILDREN: "running",
    RunStatus.SUCCEEDED: "succeeded",
    RunStatus.FAILED: "failed",
    RunStatus.REJECTED: "rejected",
    RunStatus.CANCELLED: "cancelled",
    RunStatus.EXPIRED: "expired (no decision in time)",
}
# A step's last result, in words.
STEP_WORDS = {
    "ok": "ok",
    "error": "failed",
    "skipped": "skipped",
    "retry": "to be run again",
    "cancelled": "cancelled (may have run)",
    "intent": "running",
}
STEP_ICONS = {"ok": "✅", "error": "❌", "skipped": "⏭", "not run": "▫️"}

Who = Callable[[str], str]


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: a message must fit Telegram's 4096 (the full text is in
    /explain and the trace)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def hhmm(ts: float) -> str:
    """A time as people read it in a chat: `14:03 UTC`."""
    return time.strftime("%H:%M UTC", time.gmtime(ts))


def until(deadline: float, now: float) -> str:
    """A deadline as a person weighs it: `in 9 min (05:14 UTC)`; the date when it is not
    within the next day."""
    at = hhmm(deadline) if deadline - now < 20 * 3600 else clock(deadline)
    left = deadline - now
    if left <= 0:
        return f"passed ({at})"
    minutes = round(left / 60)
    if minutes < 1:
        return f"in less than a minute ({at})"
    if minutes < 60:
        return f"in {minutes} min ({at})"
    hours, minutes = divmod(minutes, 60)
    return f"in {hours} h" + (f" {minutes} min" if minutes else "") + f" ({at})"


def clock(ts: float) -> str:
    """A date and time: `2026-05-01 14:03 UTC`."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def in_words(text: str, who: Who) -> str:
    """Free text (an error, a model's summary) with every chat identity as people know it."""
    return CHAT_IDENTITY.sub(lambda match: who(match.group()), text)


def shown_status(root: RunStatus, members: Sequence[RunStatus], pending: bool) -> RunStatus:
    """What a run tree's status is to a person: a supervised run that failed because its
    executor was rejected (or its request expired) was rejected (expired); a tree with an
    open request anywhere waits for approval; one whose children work is running."""
    if root == RunStatus.FAILED:
        for cause in (RunStatus.REJECTED, RunStatus.EXPIRED):
            if cause in members:
                return cause
    if not root.is_terminal and pending:
        return RunStatus.WAITING_APPROVAL
    if root == RunStatus.WAITING_CHILDREN:
        return RunStatus.RUNNING
    return root


def status_words(status: RunStatus) -> str:
    """An icon and the status in words: `🛑 waiting for approval`."""
    return f"{STATUS_ICONS[status]} {STATUS_WORDS[status]}"


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
        line = Markup("⌛ <b>Expired</b> at {} without a decision: {}").format(
            at, expiry_words(approval)
        )
    elif approval.status == ApprovalStatus.CANCELLED:
        line = Markup("🚫 <b>Cancelled</b> with the run by {} at {}").format(by, at)
    else:
        return ""
    if approval.note:
        line += Markup(" — {}").format(approval.note)
    return str(line)


def expiry_words(approval: ApprovalRecord) -> str:
    """What an expiry does to the run (the runbook's `on_expiry`): never consent."""
    if approval.on_expiry == "rollback" and approval.kind == "gate":
        return "nothing approved; the completed steps are rolled back, then the run stops"
    return "nothing approved; the run stopped"


def hop_lines(approval: ApprovalRecord) -> list[str]:
    """The hops a request made before its decision, for its card: `Reminded at 05:10 UTC`,
    `Escalated to group:leads at 05:12 UTC`."""
    lines = []
    if approval.reminded_at is not None:
        lines.append(f"🔔 Reminded at {hhmm(approval.reminded_at)}")
    if approval.escalated_at is not None:
        added = ", ".join(approval.escalate_to)
        lines.append(f"⏫ Escalated to {added} at {hhmm(approval.escalated_at)}")
    return lines


def mention(entry: dict[str, object]) -> str:
    """One person a hop mentions (`{"identity": ..., "display": ...}` of its outbox entry),
    as HTML: their `@name` (which notifies them), else a link to their Telegram user (which
    does too), else their identity."""
    identity, display = str(entry.get("identity") or ""), entry.get("display")
    shown = str(display) if display else identity
    kind, _, user_id = identity.partition(":")
    if kind == "telegram" and user_id.isdigit() and not shown.startswith("@"):
        return str(Markup('<a href="tg://user?id={}">{}</a>').format(user_id, shown))
    return str(Markup("{}").format(shown))


def hop_text(
    approval: ApprovalRecord,
    root_id: str,
    escalation: bool,
    mentions: Sequence[dict[str, object]],
    now: float,
    private: bool = False,
) -> str:
    """A reminder of a pending request (`escalation` False), or the news that it escalated,
    mentioning the people who may decide it (HTML): a reply to its card in the run's chat,
    or (`private`) a message of its own in one person's chat with the bot."""
    return _ENV.get_template("approval_hop.html.j2").render(
        a=approval,
        root_id=root_id,
        escalation=escalation,
        escalate_to=", ".join(approval.escalate_to),
        mentions=Markup(", ").join(Markup(mention(m)) for m in mentions),
        deadline=until(approval.deadline_at, now),
        private=private,
    )


def tally_line(approval: ApprovalRecord, votes: Sequence[ApprovalVote], who: Who) -> str:
    """For a request that needs several people: how many approved, who, and how many more
    it waits for (`1 of 2 approvals: @sam — waiting for one more`); empty for one approver."""
    if approval.required <= 1:
        return ""
    approved = [vote for vote in votes if vote.decision != "reject"]
    if not approved:
        return f"Needs {approval.required} approvals by different people"
    names = ", ".join(who(vote.decided_by) for vote in approved)
    line = f"{len(approved)} of {approval.required} approvals: {names}"
    more = approval.required - len(approved)
    if approval.status == ApprovalStatus.PENDING and more > 0:
        line += " — waiting for " + ("one more" if more == 1 else f"{more} more")
    return line


def approval_text(
    approval: ApprovalRecord,
    root_id: str,
    runbook_id: str | None,
    requested_by: str,
    who: Who,
    now: float | None = None,
    facts: dict[str, object] | None = None,
    votes: Sequence[ApprovalVote] = (),
) -> str:
    """The approval message: LIVE or DRY-RUN, the request's number, the run (its root id),
    runbook and step, where it runs, the exact action, why, the rollback, what the steps so
    far found, who asked and may decide, and the deadline; once decided, the decision line
    ends it; a request that needs several people says who approved so far (`votes`).
    `facts` (the outbox entry's payload) fills in what an older record lacks."""
    facts = facts or {}
    decided = approval.status != ApprovalStatus.PENDING
    number = approval.number or _int(facts.get("number"))
    mode = approval.mode or _str(facts.get("mode"))
    runs_on = approval.runs_on or _str(facts.get("runs_on"))
    evidence = approval.evidence or _lines(facts.get("evidence"))
    now = time.time() if now is None else now
    return _ENV.get_template("approval.html.j2").render(
        a=approval,
        number=number,
        mode=mode,
        runs_on=runs_on,
        evidence=clip("\n".join(evidence), 1200) if evidence else "",
        action=clip(approval.action, 1500),
        reason=clip(approval.reason, 500),
        rollback=clip(approval.rollback, 800) if approval.rollback else None,
        root_id=root_id,
        runbook_id=runbook_id,
        requested_by=requested_by,
        approvers=", ".join(who(d) for d in approval.all_deciders) or "any approver",
        hops=hop_lines(approval),
        who=who,
        deadline=clock(approval.deadline_at) if decided else until(approval.deadline_at, now),
        outcome=Markup(decision_line(approval, who)) if decided else "",
        tally=tally_line(approval, votes, who),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _lines(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def approval_buttons(approval: ApprovalRecord) -> list[list[tuple[str, str]]]:
    """(label, callback_data) rows of an open request's keyboard."""
    token = approval.token
    if approval.kind == "in_doubt":
        return [
            [("🔁 Run again", callback_data(token, "y")), ("⏭ Skip", callback_data(token, "s"))],
            [("❌ Abort", callback_data(token, "n"))],
        ]
    return [[("✅ Approve", callback_data(token, "y")), ("❌ Reject", callback_data(token, "n"))]]


@record
class LastStep:
    """The latest step result a progress message shows."""

    step_id: str
    result: str  # a step result: ok, error, skipped, ...
    detail: str = ""  # for a failure: what it said (the tail of its stderr)

    @property
    def words(self) -> str:
        """The result in words, with what a failure said."""
        words = STEP_WORDS.get(self.result, self.result)
        return f"{words}: {self.detail}" if self.detail and self.result != "ok" else words


@record
class Progress:
    """Where a run tree stands, in a person's terms."""

    status: RunStatus
    runbook_id: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    last: LastStep | None = None
    waiting: str | None = None  # what it waits for, in words


def progress_text(root: RunRecord, progress: Progress, who: Who, now: float) -> str:
    """The run's one progress message, rendered from where the run stands now."""
    end = root.finished_at or now
    request = root.request if len(root.request) <= 300 else root.request[:299] + "…"
    return _ENV.get_template("progress.html.j2").render(
        run=root,
        p=progress,
        icon=STATUS_ICONS[progress.status],
        status=STATUS_WORDS[progress.status],
        request=request,
        who=who,
        elapsed=_elapsed(end - root.created_at),
        last_detail=clip(progress.last.words, 400) if progress.last else "",
    )


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def run_line(
    run: RunRecord,
    now: float,
    status: RunStatus | None = None,
    who: Who | None = None,
    runbook_id: str | None = None,
) -> str:
    """One run in a list (HTML): its root id, status in words, runbook, who, and age."""
    shown = status or shown_status(run.status, [], False)
    runbook_id = runbook_id or run.runbook_id
    by = Markup(" · by {}").format(who(run.requested_by)) if who is not None else ""
    return str(
        Markup("{} <code>{}</code> {}{}{} · {} ago").format(
            STATUS_ICONS[shown],
            run.id,
            STATUS_WORDS[shown],
            Markup(" · <code>{}</code>").format(runbook_id) if runbook_id else "",
            by,
            _elapsed(now - run.created_at),
        )
    )


def telegram_length(text: str) -> int:
    """A text's length as Telegram counts it: UTF-16 code units (an emoji counts two)."""
    return len(text.encode("utf-16-le")) // 2


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
