"""ChatOps: the bot's handlers, one small async method per command or update type.

Handlers answer at once and never wait for a run: runs are driven as tasks of the RunService,
and what a run says afterwards reaches the chat through the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from typing import Any

from markupsafe import Markup
from telegram import (
    BotCommand,
    CallbackQuery,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    Update,
    User,
)
from telegram.constants import ChatType, ParseMode
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from agent.errors import (
    RequestError,
    RunbookError,
    RunExists,
    RunNotFound,
    ServiceError,
    StoreError,
    TooManyRuns,
)
from agent.records import (
    ApprovalInRun,
    ApprovalRecord,
    ApprovalStatus,
    Decision,
    Origin,
    RunRecord,
    record,
)
from agent.runbook.model import Step
from agent.service.alerts import AlertService
from agent.service.runs import RunService, validate_run_id
from agent.views.postmortem import postmortem_of
from agent.views.trace import render_trace, trace_of
from bot.alerts import AlertTaps
from bot.facts import explain_lines, outcome_line, progress_of, runbook_of, team, tree_status
from bot.messages import (
    MAX_CHUNKS,
    Who,
    clip,
    hhmm,
    html_chunks,
    parse_callback_data,
    run_line,
    shown_status,
    status_words,
    until,
)
from bot.quota import RateVerdict, rate_rule
from bot.settings import TelegramSettings
from bot.starts import CALLBACK_PREFIX as START_PREFIX
from bot.starts import (
    CANCEL_KEY,
    START_ATTEMPTS,
    card_buttons,
    card_text,
    plan_start,
    start_message,
    start_run_id,
)
from bot.starts import parse_callback_data as start_parse
from bot.store import ChatStore

log = logging.getLogger(__name__)

Context = ContextTypes.DEFAULT_TYPE

COMMANDS = [
    BotCommand(
        "run", "Start a runbook: /run <incident text> proposes one, /run <runbook id> starts it"
    ),
    BotCommand("runs", "Recent and active runs of this chat"),
    BotCommand("status", "Where a run stands: /status <id>"),
    BotCommand("explain", "A run in short (steps, requests, outcome): /explain <id>"),
    BotCommand("trace", "A run's whole journal as an offline HTML page: /trace <id>"),
    BotCommand("postmortem", "A post-mortem draft (Markdown) of an incident: /postmortem <id>"),
    BotCommand("cancel", "Cancel a run: /cancel <id>"),
    BotCommand("approve", "Approve a run's pending step: /approve <id> [#request]"),
    BotCommand("reject", "Reject it: /reject <id> [#request] [reason]"),
    BotCommand("runbooks", "The runbooks this bot can run"),
    BotCommand("help", "What this bot does"),
]

HELP = (
    "<b>loom-ops</b> runs runbooks from this chat. Risky steps wait for an approver's tap.\n\n"
    + "\n".join(f"/{c.command} — {Markup.escape(c.description)}" for c in COMMANDS)
    + "\n\nExample: <code>/run incident: API latency spike service=checkout</code>"
)
REFUSED_CHAT = "This chat is not served by this loom-ops bot."
# `#3` names a run's third request; a bare number is the start of a reason ("5 pods down").
REQUEST_NUMBER = re.compile(r"^#([0-9]{1,12})$")
REJECT_PROMPT = "why reject"
# Telegram shows a spinner until a tap is answered and drops answers after ~15 s.
TAP_ANSWER_WITHIN = 1.0
# answerCallbackQuery takes at most this much text.
MAX_ANSWER_CHARS = 200


def identity_of(user: User) -> str:
    """How loom-ops records a Telegram user: by id, which unlike a username never changes."""
    return f"telegram:{user.id}"


def display_of(user: User) -> str:
    """How people know a Telegram user: `@name`, else their full name."""
    return f"@{user.username}" if user.username else user.full_name


@record
class TapOutcome:
    """How a tap is answered, and what is done after the answer (e.g. a reject prompt)."""

    text: str
    alert: bool = False
    then: Coroutine[Any, Any, None] | None = None


@record
class RejectPrompt:
    """A ForceReply prompt asking the approver who tapped Reject for a reason."""

    token: str
    user_id: int
    run_id: str


class ChatOps:
    """The handlers of one bot over one RunService (and the bot's own tables)."""

    def __init__(self, service: RunService, chat: ChatStore, telegram: TelegramSettings) -> None:
        self._service = service
        self._chat = chat
        self._allowed = frozenset(telegram.allowed_chat_ids)
        self._approvers = frozenset(telegram.approver_ids)
        self._reject_prompts: dict[tuple[int, int], RejectPrompt] = {}
        self._names: dict[str, str] = {}
        self._private: set[str] = set()  # who wrote to the bot privately (noted once)
        self._titles: dict[int, str] = {}  # served groups' titles, for a pointer to them
        self._background: set[asyncio.Task[None]] = set()  # names being stored
        self._run_rate = telegram.run_rate, telegram.run_rate_window

    def register(self, application: Application) -> None:  # type: ignore[type-arg]
        """Add every handler, most specific first, and the error handler."""
        allowed = filters.Chat(chat_id=list(self._allowed))
        # Before everything else but the sender check (group -3): learn who people are.
        application.add_handler(TypeHandler(Update, self.note_user), group=-2)
        application.add_handler(MessageHandler(filters.COMMAND & ~allowed, self.refuse_chat))
        routes = {
            ("start", "help"): self.help,
            ("run",): self.run,
            ("runs",): self.runs,
            ("status",): self.status,
            ("explain",): self.explain,
            ("trace",): self.trace,
            ("postmortem",): self.postmortem,
            ("cancel",): self.cancel,
            ("approve",): self.approve,
            ("reject",): self.reject,
            ("runbooks",): self.runbooks,
        }
        for names, callback in routes.items():
            application.add_handler(CommandHandler(list(names), callback, filters=allowed))
        application.add_handler(MessageHandler(filters.COMMAND & allowed, self.unknown_command))
        application.add_handler(
            MessageHandler(filters.REPLY & filters.TEXT & ~filters.COMMAND & allowed, self.reply)
        )
        application.add_handler(CallbackQueryHandler(self.start_tap, pattern=f"^{START_PREFIX}:"))
        AlertTaps(self._service, self._allowed, self._remember).register(application)
        application.add_handler(CallbackQueryHandler(self.tap))
        application.add_error_handler(self.on_error)

    async def note_user(self, update: Update, context: Context) -> None:
        """Remember how the sender of anything in a served chat is shown (`@name`), so cards
        and summaries name people, not `telegram:<id>`; and who wrote to the bot privately,
        served chat or not, so reminders can reach them there. Only a new or changed fact is
        written, in the background: a busy database must not hold up a tap's answer."""
        chat, user = update.effective_chat, update.effective_user
        if chat is None or user is None or user.is_bot:
            return
        identity, display = identity_of(user), display_of(user)
        if chat.type == ChatType.PRIVATE and identity not in self._private:
            self._private.add(identity)
            self._names[identity] = display
            task = asyncio.create_task(
                self._store_private(identity, display), name="remember-private-chat"
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if chat.id not in self._allowed:
            return
        if self._names.get(identity) == display:
            return
        self._names[identity] = display
        task = asyncio.create_task(self._store_name(identity, display), name="remember-user")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_private(self, identity: str, display: str) -> None:
        try:
            await self._chat.remember_private_chat(identity, display)
        except Exception as exc:  # best effort: the next message tries again
            log.warning("could not note the private chat of %s: %s", identity, exc)
            self._private.discard(identity)

    async def _store_name(self, identity: str, display: str) -> None:
        try:
            await self._chat.remember_chat_user(identity, display)
        except Exception as exc:  # best effort: the next message tries again
            log.warning("could not store the name of %s: %s", identity, exc)
            if self._names.get(identity) == display:
                del self._names[identity]

    # -- commands --------------------------------------------------------------------------

    async def help(self, update: Update, context: Context) -> None:
        """/start and /help: what the bot does."""
        await _answer(update, HELP)

    async def unknown_command(self, update: Update, context: Context) -> None:
        """Any other command addressed to us gets the short help."""
        if _addressed_elsewhere(update, context):
            return
        await _answer(update, "Unknown command.\n\n" + HELP)

    async def refuse_chat(self, update: Update, context: Context) -> None:
        """A command from a chat not in TELEGRAM_ALLOWED_CHAT_IDS: one refusal, logged."""
        if _addressed_elsewhere(update, context):
            return
        chat = update.effective_chat
        user = update.effective_user
        log.warning(
            "refused a command from chat %s (user %s): not in TELEGRAM_ALLOWED_CHAT_IDS",
            chat.id if chat else "?",
            user.id if user else "?",
        )
        await _answer(update, REFUSED_CHAT)

    async def run(self, update: Update, context: Context) -> None:
        """/run <runbook | incident text> [key=value …]: a runbook named outright starts at
        once; free text is answered with the runbook it matches and [▶ Start] [✖ Cancel]."""
        message, user = _message_and_user(update)
        text = _arguments(message)
        if not text:
            await _answer(
                update, "Usage: <code>/run incident: API latency spike service=checkout</code>"
            )
            return
        refusal = await self._private_run_refusal(message, user, context)
        if refusal is not None:
            await _answer(update, refusal)
            return
        identity = await self._remember(user)
        if not await self._within_rate(update, identity, message):
            return
        plan = plan_start(self._service.catalog(), text)
        if plan.problem is not None:
            await _answer(update, Markup("{}").format(plan.problem))
            return
        if not plan.exact:
            if await self._started_run(message) is not None:
                # Handled again (a crash mid-handler) after a tap on its card started the run:
                # the run's messages are the answer; another card would only offer it again.
                return
            toolbox = self._service.toolbox
            effects = self._service.settings.effects  # a run started here acts so

            def mode_of(step: Step) -> str:
                return toolbox.mode_of(step, effects)

            card = card_text(plan, text, self._names.get(identity, identity), mode_of)
            await message.reply_text(
                card,
                parse_mode=ParseMode.HTML,
                reply_markup=_keyboard(card_buttons(plan)),
                # The card answers the /run message: a tap reads the request from it.
                do_quote=True,
            )
            return
        # The run id derives from the /run message (as its cards' do): a /run handled again (a
        # crash mid-handler) finds its run, whose progress message is the answer.
        for attempt in range(START_ATTEMPTS):
            run_id = _start_run_id(message, attempt)
            try:
                await self._start(run_id, text, identity, message)
            except RunExists:
                if await self._message_run(message, attempt) is not None:
                    return
                continue
            except (ServiceError, RequestError, RunbookError, StoreError, TooManyRuns) as exc:
                await _answer(update, Markup("Cannot start the run: {}").format(exc))
            # Started: the run's progress message, sent through the outbox, is the answer.
            return
        await _answer(update, "Cannot start the run: no free run id; try again.")

    async def _within_rate(self, update: Update, identity: str, asked: Message) -> bool:
        """True when `identity` may send this /run (TELEGRAM_RUN_RATE); else one short
        refusal per window, then silence, so a flood gets no flood of answers."""
        limit, window = self._run_rate
        message = f"{asked.chat.id}:{asked.message_id}"
        decision = await self._chat.judge_run_rate(identity, message, limit, window)
        if decision.verdict == RateVerdict.ADMIT:
            return True
        log.info("over the /run rate: %s (%s)", identity, decision.verdict.value)
        if decision.verdict == RateVerdict.REFUSE:
            await _answer(
                update,
                f"Too many /run messages ({rate_rule(limit, window)} per person); the next "
                f"one is taken {until(decision.free_at or time.time(), time.time())}.",
            )
        return False

    async def _start(self, run_id: str, text: str, identity: str, asked: Message) -> None:
        """Start a supervised run from the chat of the `/run` message `asked`, unless
        LOOM_OPS_MAX_ACTIVE_RUNS incidents are active already (TooManyRuns)."""
        thread_id = asked.message_thread_id if asked.is_topic_message else None
        origin = Origin(
            kind="telegram",
            chat_id=asked.chat.id,
            thread_id=thread_id,
            message_id=asked.message_id,  # how a second handling or a tap knows its run
        )
        await self._service.start(
            run_id,
            text,
            role="supervisor",
            requested_by=identity,
            origin=origin,
            wait=False,
            capped=True,
        )

    async def _private_run_refusal(
        self, message: Message, user: User, context: Context
    ) -> str | None:
        """Why a /run may not start in this private chat, or None. Approval requests go to
        the chat a run started in, so a run starts where an approver will see them: in an
        incident group when the bot serves one, else only in an approver's own chat."""
        if message.chat.type != ChatType.PRIVATE:
            return None
        groups = sorted(chat_id for chat_id in self._allowed if chat_id < 0)
        if groups:
            titles = [await self._group_title(chat_id, context) for chat_id in groups[:3]]
            where = ", ".join(str(Markup("<b>{}</b>").format(t)) for t in titles)
            return (
                "Runs start in the incident group, where approvers see their requests: "
                f"send this /run in {where}."
            )
        if user.id not in self._approvers:
            return (
                "Only an approver may start runs in a private chat: no approver would see "
                "the run's approval requests here."
            )
        return None

    async def _group_title(self, chat_id: int, context: Context) -> str:
        """A served group's title, as people know the chat (its id when unknown)."""
        if chat_id not in self._titles:
            try:
                chat = await context.bot.get_chat(chat_id)
                self._titles[chat_id] = chat.title or chat.effective_name or str(chat_id)
            except TelegramError as exc:
                log.info("cannot look up chat %s: %s", chat_id, exc)
                return f"chat {chat_id}"
        return self._titles[chat_id]

    async def start_tap(self, update: Update, context: Context) -> None:
        """A tap on a /run card: ▶ Start (the runbook its button names) or ✖ Cancel. The
        requester or an approver may tap; the card then says who did what."""
        query = update.callback_query
        assert query is not None
        try:
            text, alert = await self._judge_start_tap(query)
        except (ServiceError, RequestError, RunbookError, StoreError, TooManyRuns) as exc:
            text, alert = f"Cannot start the run: {exc}", True
        await query.answer(clip(text, MAX_ANSWER_CHARS), show_alert=alert)

    async def _judge_start_tap(self, query: CallbackQuery) -> tuple[str, bool]:
        """What a card tap does; (the tap's answer, whether it is an alert)."""
        user = query.from_user
        card = query.message if isinstance(query.message, Message) else None
        if card is None or card.chat.id not in self._allowed:
            return REFUSED_CHAT, True
        key = start_parse(query.data or "")
        if key is None or query.data not in _button_data(card):
            return "This card is closed; send /run again.", True
        asked = card.reply_to_message
        if asked is None or asked.from_user is None or not asked.text:
            return "The /run message this card answers is gone; send /run again.", True
        if user.id != asked.from_user.id and user.id not in self._approvers:
            return "Only whoever sent this /run, or an approver, may start or cancel it.", True
        identity = await self._remember(user)
        text = _arguments(asked)
        shown = self._names.get(identity, identity)
        if key == CANCEL_KEY:
            started = await self._started_run(asked)
            if started is not None:
                return f"Already started as {started.id}; /cancel {started.id} stops it.", True
            await self._close_card(
                card,
                Markup("✖ Not started: cancelled by {} at {}.").format(shown, hhmm(time.time())),
            )
            return "Cancelled; nothing was started.", False
        plan = plan_start(self._service.catalog(), text)
        choice = next((c for c in plan.choices if c.key == key), None)
        if choice is None:
            return "The runbooks changed since this card; send /run again.", True
        message = start_message(text, choice.runbook.id)
        requester = identity_of(asked.from_user)
        # The run id derives from the /run message, not from this card: every tap of every
        # card answering one /run (a card sent again when its update was handled again) finds
        # the one run.
        for attempt in range(START_ATTEMPTS):
            run_id = _start_run_id(asked, attempt)
            try:
                await self._start(run_id, message, requester, asked)
            except RunExists:
                started = await self._message_run(asked, attempt)
                if started is not None:
                    return f"Already started as {started.id}.", False
                continue
            await self._close_card(
                card,
                Markup("▶ Started <code>{}</code> by {} at {}: run <code>{}</code>.").format(
                    choice.runbook.id, shown, hhmm(time.time()), run_id
                ),
            )
            return f"Started: run {run_id}.", False
        return "Cannot start the run: no free run id; try again.", True

    async def _message_run(self, asked: Message, attempt: int) -> RunRecord | None:
        """The run the `/run` message `asked` started under the id of `attempt`, if it did;
        None when no run or another message's run holds that id."""
        try:
            run = await self._service.get(_start_run_id(asked, attempt))
        except RunNotFound:
            return None
        # The message itself, not its words: another /run with the same text is another run.
        if (run.origin.chat_id, run.origin.message_id) != (asked.chat.id, asked.message_id):
            return None
        return run

    async def _started_run(self, asked: Message) -> RunRecord | None:
        """The run the `/run` message `asked` started (at once or from a card), if any."""
        for attempt in range(START_ATTEMPTS):
            run = await self._message_run(asked, attempt)
            if run is not None:
                return run
        return None

    async def _close_card(self, card: Message, outcome: Markup) -> None:
        """Say on the card what became of it, without its buttons (best effort)."""
        try:
            await card.edit_text(
                str(Markup("{}\n\n{}").format(Markup(card.text_html or ""), outcome)),
                parse_mode=ParseMode.HTML,
            )
        except TelegramError as exc:
            log.info("could not close /run card %s: %s", card.message_id, exc)

    async def runs(self, update: Update, context: Context) -> None:
        """/runs: the chat's active runs, then its recent ones (root runs: their planner,
        executor and verifier stand behind them)."""
        message, _ = _message_and_user(update)
        active = await self._service.chat_runs(message.chat.id, limit=25, active=True)
        recent = await self._service.chat_runs(message.chat.id, limit=10 + len(active))
        done = [r for r in recent if r.status.is_terminal][:10]
        if not active and not done:
            await _answer(update, "No runs from this chat yet. Start one with /run.")
            return
        now = time.time()
        lines = []
        for title, runs in (("Active", active), ("Recent", done)):
            if runs:
                lines.append(f"<b>{title}</b>")
                for run in runs:
                    tree = await self._service.run_tree(run.id, calls=False)
                    lines.append(run_line(run, now, tree_status(tree), tree.name, runbook_of(tree)))
        await _answer(update, "\n".join(lines))

    async def status(self, update: Update, context: Context) -> None:
        """/status <id>: where a run stands: steps done, its team, what it waits for."""
        run = await self._chat_run(update, context)
        if run is None:
            return
        now = time.time()
        tree = await self._service.run_tree(run.id)
        progress = progress_of(tree, now)
        lines = [Markup(run_line(run, now, progress.status, tree.name, progress.runbook_id))]
        if progress.steps_total:
            line = Markup("Steps: {} of {} done").format(progress.steps_done, progress.steps_total)
            if progress.last is not None:
                line += Markup("; last <code>{}</code> {}").format(
                    progress.last.step_id, clip(progress.last.words, 400)
                )
            lines.append(line)
        if tree.children:
            members = Markup(" · ").join(
                Markup("{} {}").format(
                    child.role, status_words(shown_status(child.status, [], False))
                )
                for child in team(tree)
            )
            lines.append(Markup("Team: {}").format(members))
        for pending in tree.pending[:3]:
            number = pending.number or pending.id
            lines.append(
                Markup("Waiting for approval #{} of step <code>{}</code>: <code>{}</code>").format(
                    number, pending.step_id or "-", clip(pending.action, 1000)
                )
            )
            lines.append(
                Markup("Deadline {} · <code>/approve {} #{}</code>").format(
                    until(pending.deadline_at, now), run.id, number
                )
            )
        ending = outcome_line(tree)
        if ending:
            lines.append(Markup(ending))
        await _answer(update, str(Markup("\n").join(lines)))

    async def explain(self, update: Update, context: Context) -> None:
        """/explain <id>: the run in short: each step's state, each approval, the outcome
        (the whole journal is /trace)."""
        run = await self._chat_run(update, context)
        if run is None:
            return
        lines = explain_lines(await self._service.run_tree(run.id, calls=False, events=True))
        html = "\n".join(lines)
        chunks = html_chunks(html)
        if chunks is None or len(chunks) > MAX_CHUNKS:
            text = "\n".join(Markup(line).striptags() for line in lines)
            await _message_and_user(update)[0].reply_document(
                InputFile(text.encode("utf-8"), filename=f"{run.id}-explain.txt"),
                caption=f"Run {run.id} in short ({len(lines)} lines); the journal: /trace {run.id}",
            )
            return
        for chunk in chunks:
            await _answer(update, chunk)

    async def trace(self, update: Update, context: Context) -> None:
        """/trace <id>: the offline HTML trace of the run tree, as a document."""
        run = await self._chat_run(update, context)
        if run is None:
            return
        tree = await self._service.run_tree(run.id, calls=False, events=True)
        html = render_trace(trace_of(tree))
        await _message_and_user(update)[0].reply_document(
            InputFile(html.encode("utf-8"), filename=f"{run.id}.html"),
            caption=f"Trace of run {run.id} ({run.status}); open it in a browser, works offline.",
        )

    async def postmortem(self, update: Update, context: Context) -> None:
        """/postmortem <id>: a Markdown post-mortem draft of the incident, as a document."""
        run = await self._chat_run(update, context)
        if run is None:
            return
        tree = await self._service.run_tree(run.id, calls=False, events=True)
        draft = postmortem_of(tree, await AlertService(self._service).incident_of_run(run.id))
        await _message_and_user(update)[0].reply_document(
            InputFile(draft.encode("utf-8"), filename=f"postmortem-{run.id}.md"),
            caption=f"Post-mortem draft of run {run.id} ({run.status}): the facts from its "
            "journal; the cause and the follow-ups are yours to write.",
        )

    async def cancel(self, update: Update, context: Context) -> None:
        """/cancel <id>: cancel a run (and the runs below it); approvers and the requester."""
        run = await self._chat_run(update, context)
        if run is None:
            return
        _, user = _message_and_user(update)
        identity = await self._remember(user)
        if user.id not in self._approvers and identity != run.requested_by:
            await _answer(update, "Only an approver or whoever started the run may cancel it.")
            return
        try:
            await self._service.cancel(run.id, by=identity, wait=False)
        except ServiceError as exc:
            await _answer(update, Markup("Cannot cancel: {}").format(exc))
            return
        await _answer(update, Markup("🚫 Cancelled run <code>{}</code>.").format(run.id))

    async def approve(self, update: Update, context: Context) -> None:
        """/approve <id> [#request]: the text form of the Approve button, same rules."""
        await self._decide_by_text(update, context, Decision.APPROVE)

    async def reject(self, update: Update, context: Context) -> None:
        """/reject <id> [#request] [reason]: the text form of the Reject button, same rules."""
        await self._decide_by_text(update, context, Decision.REJECT)

    async def runbooks(self, update: Update, context: Context) -> None:
        """/runbooks: what the bot can run."""
        catalog = self._service.catalog()
        if not catalog.runbooks:
            await _answer(update, "No runbooks in this workspace.")
            return
        lines = ["<b>Runbooks</b>"]
        for runbook in sorted(catalog.runbooks.values(), key=lambda rb: rb.id):
            gated = sum(1 for step in runbook.steps if step.needs_approval)
            lines.append(
                str(
                    Markup("<code>{}</code> — {} ({} steps, {} gated)").format(
                        runbook.id, runbook.title, len(runbook.steps), gated
                    )
                )
            )
        await _answer(update, "\n".join(lines))

    # -- approvals -------------------------------------------------------------------------

    async def tap(self, update: Update, context: Context) -> None:
        """A button tap: answered at once; decided only for an approver, first decision wins.

        The answer waits for the decision at most TAP_ANSWER_WITHIN seconds (a busy database,
        say); after that the tap is answered as in progress, and a refusal that comes later
        is said in the chat instead of an alert.
        """
        query = update.callback_query
        assert query is not None
        work = asyncio.ensure_future(self._judge_tap(query))
        try:
            async with asyncio.timeout(TAP_ANSWER_WITHIN):
                outcome = await asyncio.shield(work)
        except TimeoutError:
            await query.answer("Working on it: the request's message says when it is decided.")
            outcome = await work
            if outcome.alert and isinstance(query.message, Message):
                await query.message.reply_text(
                    str(
                        Markup("{}: {}").format(
                            Markup(query.from_user.mention_html()), outcome.text
                        )
                    ),
                    parse_mode=ParseMode.HTML,
                    do_quote=False,
                )
        else:
            await query.answer(clip(outcome.text, MAX_ANSWER_CHARS), show_alert=outcome.alert)
        if outcome.then is not None:
            await outcome.then

    async def _judge_tap(self, query: CallbackQuery) -> TapOutcome:
        """What a tap does, and what its answer says."""
        user = query.from_user
        parsed = parse_callback_data(query.data or "")
        message = query.message if isinstance(query.message, Message) else None
        chat_id = message.chat.id if message else None
        if chat_id not in self._allowed:
            _log_refusal(chat_id, user, "a button", "the chat is not in TELEGRAM_ALLOWED_CHAT_IDS")
            return TapOutcome(REFUSED_CHAT, alert=True)
        if parsed is None:
            _log_refusal(chat_id, user, "a button", "the button is not one of ours")
            return TapOutcome("This button is not one of ours; nothing changed.", alert=True)
        token, choice = parsed
        refusal = self._decider_refusal(user.id)
        if refusal is not None:
            _log_refusal(chat_id, user, await self._tap_subject(token, chat_id), refusal)
            return TapOutcome(
                "You are not an approver here (TELEGRAM_APPROVER_IDS); nothing changed.",
                alert=True,
            )
        # One read for the button's request, one transaction for the decision: a tap costs
        # two store round trips (what the decision wakes runs in the background).
        request = await self._request_in_chat(token, chat_id)
        if request is None:
            _log_refusal(chat_id, user, _subject(None), "unknown or stale request")
            return TapOutcome("Unknown or stale request; nothing changed.", alert=True)
        approval = request.approval
        if approval.status != ApprovalStatus.PENDING:
            return TapOutcome(_already(approval, request.name), alert=True)
        identity = await self._remember(user)
        if choice == "n":
            try:
                self._service.check_decider(approval, identity)
            except ServiceError as exc:
                _log_refusal(chat_id, user, _subject(request), exc)
                return TapOutcome(f"Refused: {exc}", alert=True)
            assert message is not None
            return TapOutcome(
                "Reply to the prompt with the reason ('-' for none).",
                then=self._prompt_for_reason(message, request, user),
            )
        decision = Decision.APPROVE if choice == "y" else Decision.SKIP
        try:
            result = await self._service.decide_request(request, decision, identity, wait=False)
        except ServiceError as exc:
            _log_refusal(chat_id, user, _subject(request), exc)
            return TapOutcome(f"Refused: {exc}", alert=True)
        if result.approval.status == ApprovalStatus.PENDING:  # counted (or counted before)
            return TapOutcome(f"{result.message[:1].upper()}{result.message[1:]}.")
        if not result.changed:
            return TapOutcome(await self._decided_first(result.approval), alert=True)
        return TapOutcome("Approved: the run goes on." if choice == "y" else "Skipped.")

    async def _tap_subject(self, token: str, chat_id: int | None) -> str:
        """What a refused non-approver's tap was about, for the log. Read only for the log
        (an approver's tap keeps to two store round trips), and best effort: the refusal
        is answered whatever the store says."""
        try:
            return _subject(await self._request_in_chat(token, chat_id))
        except StoreError as exc:
            log.info("cannot look up a refused tap's request: %s", exc)
            return "a request"

    def _decider_refusal(self, user_id: int) -> str | None:
        """Why a decision by this user is not even checked (for the log), or None when it is
        worth checking: an id of TELEGRAM_APPROVER_IDS, or a person of the people file (the
        runbook's approvers then say whether they may)."""
        if user_id in self._approvers:
            return None
        try:
            known = self._service.people().person(f"telegram:{user_id}").known
        except ServiceError as exc:  # a bad people file: the settings alone say who may decide
            return f"not in TELEGRAM_APPROVER_IDS, and the people file cannot be read: {exc}"
        return None if known else "in neither TELEGRAM_APPROVER_IDS nor the people file"

    async def _prompt_for_reason(
        self, message: Message, request: ApprovalInRun, user: User
    ) -> None:
        """Reject asks for a reason through a ForceReply prompt; the reply decides."""
        approval = request.approval
        prompt = await message.reply_text(
            str(
                Markup(
                    "{}, {} step <code>{}</code> of run <code>{}</code>? Reply to this message "
                    "with the reason, or <code>-</code> for none."
                ).format(
                    Markup(user.mention_html()),
                    REJECT_PROMPT,
                    approval.step_id or "-",
                    request.root_id,
                )
            ),
            parse_mode=ParseMode.HTML,
            reply_markup=ForceReply(selective=True, input_field_placeholder="Reason to reject"),
        )
        key = (prompt.chat.id, prompt.message_id)
        self._reject_prompts[key] = RejectPrompt(approval.token, user.id, approval.run_id)

    async def reply(self, update: Update, context: Context) -> None:
        """A reply to one of our reject prompts carries the reason; other replies are chat."""
        message, user = _message_and_user(update)
        replied = message.reply_to_message
        if replied is None or replied.from_user is None or replied.from_user.id != context.bot.id:
            return
        prompt = self._reject_prompts.get((message.chat.id, replied.message_id))
        if prompt is None:
            if REJECT_PROMPT in (replied.text or ""):  # asked before a restart: say so
                await _answer(
                    update,
                    "That prompt is no longer open: tap ❌ Reject again, or send "
                    "<code>/reject &lt;id&gt; &lt;reason&gt;</code>.",
                )
            return
        if user.id != prompt.user_id:
            _log_refusal(
                message.chat.id,
                user,
                f"run {prompt.run_id}",
                "only the approver who tapped Reject answers its reason prompt",
            )
            await _answer(update, "Only the approver who tapped Reject answers this prompt.")
            return
        identity = await self._remember(user)
        reason = (message.text or "").strip()
        note = None if reason in ("", "-") else reason
        try:
            result = await self._service.decide(
                prompt.run_id,
                Decision.REJECT,
                identity,
                note=note,
                approval_token=prompt.token,
                wait=False,
            )
        except ServiceError as exc:
            _log_refusal(message.chat.id, user, f"run {prompt.run_id}", exc)
            await _answer(update, Markup("Refused: {}").format(exc))
            return
        del self._reject_prompts[(message.chat.id, replied.message_id)]
        if not result.changed:
            await _answer(update, Markup("{}").format(await self._decided_first(result.approval)))

    async def _decide_by_text(self, update: Update, context: Context, decision: Decision) -> None:
        run = await self._chat_run(update, context)
        if run is None:
            return
        message, user = _message_and_user(update)
        refusal = self._decider_refusal(user.id)
        if refusal is not None:
            _log_refusal(message.chat.id, user, f"run {run.id}", refusal)
            await _answer(update, "You are not an approver here (TELEGRAM_APPROVER_IDS).")
            return
        identity = await self._remember(user)
        words = context.args[1:] if context.args else []
        approval_number = None
        if words and (number := REQUEST_NUMBER.match(words[0])):
            approval_number, words = int(number.group(1)), words[1:]
        note = " ".join(words) or None
        if decision == Decision.APPROVE and note:
            await _answer(update, "Usage: <code>/approve &lt;id&gt; [#request]</code>")
            return
        try:
            result = await self._service.decide(
                run.id, decision, identity, note=note, approval_number=approval_number, wait=False
            )
        except ServiceError as exc:
            number = f" request #{approval_number}" if approval_number is not None else ""
            _log_refusal(message.chat.id, user, f"run {run.id}{number}", exc)
            hint = f" (e.g. /approve {run.id} #2)" if "by its number" in str(exc) else ""
            await _answer(update, Markup("Refused: {}{}").format(str(exc), hint))
            return
        if result.approval.status == ApprovalStatus.PENDING:  # counted (or counted before)
            await _answer(
                update, Markup("Request #{}: {}.").format(result.approval.number, result.message)
            )
            return
        if not result.changed:
            await _answer(update, Markup("{}").format(await self._decided_first(result.approval)))
            return
        verb = "Approved" if decision == Decision.APPROVE else "Rejected"
        await _answer(
            update,
            Markup("{} request #{} of run <code>{}</code>.").format(
                verb, result.approval.number, run.id
            ),
        )

    async def _request_in_chat(self, token: str, chat_id: int | None) -> ApprovalInRun | None:
        """The request a button names, if it exists and belongs to a run of this chat."""
        try:
            request = await self._service.approval_request(token=token)
        except ServiceError:  # no such request (stale or forged)
            return None
        return request if request.run.origin.chat_id == chat_id else None

    # -- plumbing --------------------------------------------------------------------------

    async def _chat_run(self, update: Update, context: Context) -> RunRecord | None:
        """The run named by the first argument, if it belongs to this chat, as its incident's
        root run (a chat deals in incidents: their planner, executor and verifier stand
        behind the root); else say why."""
        message, _ = _message_and_user(update)
        command = (message.text or "/").split()[0].split("@")[0]
        if not context.args:
            await _answer(update, Markup("Usage: <code>{} &lt;run id&gt;</code>").format(command))
            return None
        run_id = context.args[0]
        try:
            validate_run_id(run_id)
            run = await self._service.get(run_id)
        except (ServiceError, RunNotFound):
            run = None
        if run is None or run.origin.chat_id != message.chat.id:
            await _answer(update, Markup("No run <code>{}</code> in this chat.").format(run_id))
            return None
        if run.parent_id is not None:
            run = await self._service.root(run.id)
        return run

    async def _decided_first(self, approval: ApprovalRecord) -> str:
        """What a decision that lost the race says: who decided first, and what (one more
        read, for how people know them)."""
        request = await self._service.approval_request(approval.id)
        return _already(request.approval, request.name)

    async def _remember(self, user: User) -> str:
        """The user's identity; their display name is stored when it is new or changed."""
        identity = identity_of(user)
        display = display_of(user)
        if self._names.get(identity) != display:
            await self._chat.remember_chat_user(identity, display)
            self._names[identity] = display
        return identity

    async def on_error(self, update: object, context: Context) -> None:
        """Log every handler exception; answer briefly so nobody waits on a dead button."""
        log.error("handling an update failed: %r", context.error, exc_info=context.error)
        if not isinstance(update, Update):
            return
        try:
            if update.callback_query is not None:
                await update.callback_query.answer("Something went wrong; it is logged.")
            elif update.effective_message is not None:
                await update.effective_message.reply_text("⚠️ Something went wrong; it is logged.")
        except TelegramError as exc:  # e.g. the query was answered already
            log.info("could not tell the chat about the error: %s", exc)


def _log_refusal(chat_id: int | None, user: User, subject: str, reason: object) -> None:
    """One WARNING line for a refused decision: the chat, who, on what, and why. The person
    refused sees only their alert; whoever runs the bot learns from this line why a tap did
    nothing (a runbook naming someone else, four eyes, a bad people file)."""
    log.warning(
        "refused a decision in chat %s by %s on %s: %s", chat_id, identity_of(user), subject, reason
    )


def _subject(request: ApprovalInRun | None) -> str:
    """What a refused tap was about, for the log: `run tg-1a2b3c request #1`."""
    if request is None:
        return "an unknown request"
    return f"run {request.root_id} request #{request.approval.number}"


def _already(approval: ApprovalRecord, who: Who) -> str:
    """A request decided before: by whom (as people know them) and what."""
    by = f" by {who(approval.decided_by)}" if approval.decided_by else ""
    return f"Already {approval.status}{by}; nothing changed."


def _message_and_user(update: Update) -> tuple[Message, User]:
    message = update.effective_message
    user = update.effective_user
    assert message is not None and user is not None  # command and text handlers only
    return message, user


def _start_run_id(asked: Message, attempt: int) -> str:
    """The run id the `/run` message `asked` starts under at `attempt`."""
    return start_run_id(asked.chat.id, asked.message_id, int(asked.date.timestamp()), attempt)


def _arguments(message: Message) -> str:
    """The text after the command word, as typed (quotes and spacing kept)."""
    parts = (message.text or "").split(maxsplit=1)
    return parts[1].strip() if len(parts) == 2 else ""


def _addressed_elsewhere(update: Update, context: Context) -> bool:
    """True for `/cmd@otherbot`: in a group, another bot's command is none of our business."""
    message = update.effective_message
    first = (message.text or "").split(maxsplit=1)[0] if message and message.text else ""
    _, _, addressee = first.partition("@")
    return bool(addressee) and addressee.lower() != (context.bot.username or "").lower()


def _keyboard(rows: list[list[tuple[str, str]]]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(label, callback_data=data) for label, data in row] for row in rows]
    )


def _button_data(message: Message) -> set[str]:
    """The callback_data of a message's buttons as Telegram holds them now (a closed card
    has none, so a replayed or forged tap on it does nothing)."""
    markup = message.reply_markup
    if markup is None:
        return set()
    return {
        str(button.callback_data)
        for row in markup.inline_keyboard
        for button in row
        if button.callback_data is not None
    }


async def _answer(update: Update, html: str) -> None:
    """Reply in the same chat (and topic) in HTML."""
    message = update.effective_message
    assert message is not None
    await message.reply_text(str(html), parse_mode=ParseMode.HTML, do_quote=False)
