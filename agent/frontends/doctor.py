"""`loom-ops doctor`: check the configuration end to end before a run trips over it.

Each check yields findings, one line each with a severity: `error` (a run, the bot or a
decision will fail on it: exit 1), `warning` (it will fail once a setting is switched on, or
only some runs are affected) and `ok` (what was checked and passed). No run starts, and the
store is opened only when an audit key is set without LOOM_OPS_AUDIT_KEYED_SINCE, to read the
run number to record. It asks: the MCP servers runbooks use, started for
their `tools/list` and stopped (each within its startup timeout), one tiny LLM completion (when
a key is set and the mock is not asked for) and one Bot API `getMe` (when a bot token is set),
each with a short timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import LoomOpsError, PeopleFileError, ServingRefused
from agent.people import (
    APPROVERS_GROUP,
    GROUP_PREFIX,
    People,
    Person,
    PersonEntry,
    load_people,
    load_people_file,
)
from agent.records import record
from agent.redaction import Redactor
from agent.runbook.model import Runbook, RunbookReport, sample_commands, validate_runbooks
from agent.settings import Settings
from agent.tools.allowlist import ShellAllowlist, read_allowlist
from agent.tools.mcp_check import check_mcp_tools, mcp_uses

if TYPE_CHECKING:
    import httpx

Severity = Literal["error", "warning", "ok"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "ok")
DEFAULT_TIMEOUT = 5.0  # seconds per network check: a doctor that hangs helps nobody
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
_MAX_SAID = 200  # characters of a server's own words quoted in a finding


@record
class Finding:
    """One thing the doctor found: how bad (`severity`), which check, and what to do."""

    severity: Severity
    check: str
    message: str

    def line(self) -> str:
        """The finding as one aligned line: `error    allowlist  ...`."""
        return f"{self.severity:<8} {self.check:<10} {' '.join(self.message.split())}"


async def diagnose(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> list[Finding]:
    """Every finding about this configuration, errors first (then in the checks' order)."""
    findings: list[Finding] = []
    allowlist, allowlist_findings = _allowlist(settings)
    reports, runbook_findings = _runbooks(settings, allowlist)
    runbooks = [r.runbook for r in reports if r.runbook is not None]
    findings += runbook_findings
    findings += allowlist_findings
    findings += _binaries(settings, allowlist, runbooks)
    redactor = Redactor(settings.redact_patterns, settings.secret_values())
    # What waits on another process (MCP servers starting, the LLM, the Bot API) runs at once.
    mcp, llm, telegram = await asyncio.gather(
        _mcp(settings, runbooks),
        _llm(settings, redactor, timeout),
        _telegram(settings, redactor, timeout),
    )
    findings += mcp
    findings += _people(settings, runbooks)
    findings += llm
    findings += telegram
    findings.append(await _audit_key(settings))
    order = {severity: index for index, severity in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])  # stable: checks keep their order


async def _audit_key(settings: Settings) -> Finding:
    """Whether the journal is chained under an audit key (only its public id is shown), and
    from which run on: with a key but no LOOM_OPS_AUDIT_KEYED_SINCE, the store is read (only
    then) for the number to record, since verify takes no anchor from the store itself."""
    from agent.service.runs import RunService

    key = settings.audit_secret()
    if key is None:
        return Finding(
            "warning",
            "audit",
            "no LOOM_OPS_AUDIT_KEY: the journal's chain is unkeyed, and anyone who can write "
            "the store could rewrite it and recompute the chain; set a secret of 16+ "
            "characters kept off the store's host",
        )
    said = f"the journal is chained under audit key {key.id}"
    if settings.audit_keyed_since is not None:
        return Finding("ok", "audit", f"{said}, in force since run #{settings.audit_keyed_since}")
    try:
        anchor = await RunService.audit_anchor(settings)
    except LoomOpsError as exc:
        return Finding("warning", "audit", f"{said}; cannot read the store to say since which "
                       f"run: {exc}")  # fmt: skip
    if anchor is None or not anchor.any_unkeyed:
        since, why = 1, "every run of this store is keyed"
    else:
        since = anchor.first_keyed if anchor.first_keyed is not None else anchor.counter + 1
        why = (
            f"runs before #{since} were written without it"
            if anchor.first_keyed is not None
            else f"its {anchor.counter} run(s) were written without it; the next is #{since}"
        )
    return Finding(
        "warning",
        "audit",
        f"{said}, but nothing outside the store says since which run: record "
        f"LOOM_OPS_AUDIT_KEYED_SINCE={since} with the key ({why}); until then `audit verify` "
        "accepts no unkeyed event, and once set it takes a later unkeyed run for a stripped one",
    )


# -- runbooks and the shell allowlist -----------------------------------------------------------


def _allowlist(settings: Settings) -> tuple[ShellAllowlist | None, list[Finding]]:
    """The allowlist in force (None when it cannot be read) and what is wrong with it."""
    allowlist, problem = read_allowlist(settings.allowlist_path)
    if problem is not None:
        severity: Severity = "error" if settings.allow_shell else "warning"
        return allowlist, [Finding(severity, "allowlist", problem)]
    assert allowlist is not None  # read, and found
    live = "live shell on" if settings.allow_shell else "dry-run: LOOM_OPS_ALLOW_SHELL is off"
    return allowlist, [
        Finding(
            "ok",
            "allowlist",
            f"{settings.allowlist_path}: {len(allowlist.rules)} rule(s) ({live})",
        )
    ]


def _runbooks(
    settings: Settings, allowlist: ShellAllowlist | None
) -> tuple[list[RunbookReport], list[Finding]]:
    """Every runbook error (and allowlist gap) of the workspace, one finding each."""
    directory = settings.runbooks_dir
    if not directory.is_dir():
        return [], [Finding("error", "runbooks", f"no runbook directory at {directory}")]
    # A missing allowlist is one finding already, not one per command.
    checked = allowlist if allowlist is not None and allowlist.found else None
    reports = validate_runbooks(directory, checked, live_shell=settings.allow_shell)
    findings = []
    gap: Severity = "error" if settings.allow_shell else "warning"
    for report in reports:
        findings += [Finding("error", "runbooks", str(e)) for e in report.file_errors]
        findings += [Finding(gap, "allowlist", str(e)) for e in report.gaps]
    good = sum(1 for r in reports if r.runbook is not None)
    if not reports:
        findings.append(Finding("warning", "runbooks", f"no runbooks in {directory}"))
    elif good:
        findings.append(Finding("ok", "runbooks", f"{good} of {len(reports)} runbook(s) valid"))
    return reports, findings


def _binaries(
    settings: Settings, allowlist: ShellAllowlist | None, runbooks: Sequence[Runbook]
) -> list[Finding]:
    """Binaries that runbook commands name and the allowlist's path does not hold."""
    # Without a readable allowlist, look where it would look by default.
    where = allowlist if allowlist is not None else ShellAllowlist()
    users: dict[str, list[str]] = {}
    for runbook in runbooks:
        for sample in sample_commands(runbook):
            if sample.argv is not None:
                users.setdefault(sample.argv[0], [])
                if runbook.id not in users[sample.argv[0]]:
                    users[sample.argv[0]].append(runbook.id)
    if not users:
        return []
    severity: Severity = "error" if settings.allow_shell else "warning"
    path = os.pathsep.join(where.path)
    findings = [
        Finding(
            severity,
            "binaries",
            f"{binary} is not an executable in the allowlist's path ({path}); "
            f"used by {', '.join(runbook_ids)}: install it, or add its directory to the "
            'allowlist\'s "path"',
        )
        for binary, runbook_ids in sorted(users.items())
        if where.which(binary) is None
    ]
    if not findings:
        findings.append(Finding("ok", "binaries", f"found: {', '.join(sorted(users))}"))
    return findings


# -- MCP ----------------------------------------------------------------------------------------


async def _mcp(settings: Settings, runbooks: Sequence[Runbook]) -> list[Finding]:
    """MCP tools runbooks name that the MCP config does not resolve, servers that cannot
    start, and tools their server does not offer (`tools/list`): see agent.tools.mcp_check."""
    uses = mcp_uses(runbooks, settings.allow_mcp, settings.live_checks)
    found = await check_mcp_tools(settings.mcp_config_path, uses)
    return [Finding(f.severity, "mcp", f.message) for f in found]


# -- people and approvers -----------------------------------------------------------------------

# The front ends a person may act on whatever else is set: the CLI is installed wherever this
# runs, and `serve` always has the HTTP API (its decisions are `api:` identities).
_ALWAYS_RUNNING = ("cli", "api")


def _people(settings: Settings, runbooks: Sequence[Runbook]) -> list[Finding]:
    """What the people file and the approver settings mean for the runbooks: groups nobody
    is in, people nobody can act as, runbooks nobody may decide or start (entries are matched
    by person and group, as decisions and starts are: agent.people)."""
    try:
        people = load_people(settings)
        # Read again for its people without any identity: lookups by identity never find them.
        entries = load_people_file(people.source).people if people.source else []
    except PeopleFileError as exc:
        return [Finding("error", "people", str(exc))]
    persons = _persons(people)
    findings = _empty_groups(settings, people, persons, runbooks)
    findings += _without_front_end(settings, people, persons, entries)
    if not findings:
        findings.append(Finding("ok", "people", _who_is_who(settings, people, persons)))
    findings += _approvers(settings, people, persons, runbooks)
    findings += _starters(people, persons, runbooks)
    return findings


def _persons(people: People) -> list[Person]:
    """Every person with an identity (the file's and the approver settings'), once each."""
    return list({p.name: p for p in people.by_identity.values()}.values())


def _who_is_who(settings: Settings, people: People, persons: Sequence[Person]) -> str:
    """The ok line: where people come from, and how many are in each group."""
    if people.source is None:
        return (
            f"no people file at {settings.people_path}: each approver setting is a person of "
            f"its own ({len(persons)})"
        )
    groups = sorted({g for p in persons for g in p.groups})
    counts = ", ".join(f"{g} ({sum(1 for p in persons if g in p.groups)})" for g in groups)
    return f"{people.source}: {len(persons)} people; groups: {counts or 'none'}"


def _empty_groups(
    settings: Settings, people: People, persons: Sequence[Person], runbooks: Sequence[Runbook]
) -> list[Finding]:
    """Groups runbooks (or LOOM_OPS_APPROVERS, LOOM_OPS_ESCALATE_TO) name that no person is
    in. A warning: the list may admit someone else; a list left with nobody is the approvers'
    or starters' error (an escalation to nobody adds no decider: the request goes on)."""
    named: dict[str, list[str]] = {}
    for runbook in runbooks:
        for kind, entries in (
            ("approvers", runbook.approvers),
            ("starters", runbook.starters),
            ("escalation.escalate_to", runbook.escalation.escalate_to),
        ):
            for entry in entries:
                if _is_group(entry):
                    named.setdefault(entry, []).append(f"{runbook.id} ({kind})")
        for step in runbook.steps:
            rule = step.approval_rule
            for entry in rule.from_ if rule else ():
                if _is_group(entry):
                    named.setdefault(entry, []).append(f"{runbook.id} (step {step.id} approval)")
    for setting, entries in (
        ("LOOM_OPS_APPROVERS", settings.approvers),
        ("LOOM_OPS_ESCALATE_TO", settings.escalate_to),
    ):
        for entry in entries:
            if _is_group(entry):
                named.setdefault(entry, []).append(setting)
    members = {g for p in persons for g in p.groups}
    where = people.source or settings.people_path
    findings = []
    for entry, users in sorted(named.items()):
        group = entry.removeprefix(GROUP_PREFIX)
        if group in members:
            continue
        fix = f"add it to a person's groups in {where}"
        if group == APPROVERS_GROUP:  # the settings fill it too
            fix += ", or set LOOM_OPS_APPROVERS or TELEGRAM_APPROVER_IDS"
        findings.append(
            Finding(
                "warning",
                "people",
                f"{entry} is named by {', '.join(users)} but no person is in it: {fix}",
            )
        )
    return findings


def _without_front_end(
    settings: Settings,
    people: People,
    persons: Sequence[Person],
    entries: Sequence[PersonEntry],
) -> list[Finding]:
    """People nobody can act as here: one without a cli: or telegram: identity (only an API
    token, if any, which doctor does not open the store to see), and one whose identities
    are all on front ends this process does not run (a Telegram id without
    TELEGRAM_BOT_TOKEN); warnings both."""
    findings = [
        Finding(  # a warning: they may act through an API token, which doctor cannot see
            "warning",
            "people",
            f"{entry.name} in {people.source} has no cli: or telegram: identity: they can "
            f"act only through an API token (loom-ops tokens create --person {entry.name}); "
            "give them a cli: login or a telegram: user id, or remove them",
        )
        for entry in entries
        if not entry.identities()
    ]
    running = {*_ALWAYS_RUNNING, *(["telegram"] if settings.telegram_bot_token else [])}
    where = people.source or settings.people_path
    for person in persons:
        kinds = {identity.partition(":")[0] for identity in person.identities}
        if kinds & running:
            continue
        if person.known:
            who = person.name
        else:  # a person the settings alone make: name the setting
            setting = set(person.identities) & set(settings.approvers)
            who = f"{person.name} ({'LOOM_OPS_APPROVERS' if setting else 'TELEGRAM_APPROVER_IDS'})"
        reasons = ["TELEGRAM_BOT_TOKEN is not set"] if "telegram" in kinds else []
        if others := sorted(kinds - {"telegram"}):  # e.g. `slack:` in LOOM_OPS_APPROVERS
            reasons.append(f"no front end decides as {', '.join(k + ':' for k in others)}")
        fix = f"give them a cli: login in {where}"
        findings.append(
            Finding(
                "warning",
                "people",
                f"{who} has no identity on a front end this process runs: only "
                f"{', '.join(person.identities)}, and {'; '.join(reasons)} "
                f"({'set it, or ' + fix if not others else fix})",
            )
        )
    return findings


def _approvers(
    settings: Settings, people: People, persons: Sequence[Person], runbooks: Sequence[Runbook]
) -> list[Finding]:
    """Approver settings that no runbook accepts, runbooks nobody configured may approve, and
    four-eyes runbooks only one person may approve (nobody may decide that person's runs)."""
    telegram_ids = _telegram_approver_ids()
    # Runbooks that can ask a person: gated steps, and steps that act (an attempt in doubt).
    deciding = [
        r
        for r in runbooks
        if any(s.needs_approval or s.run is not None or s.mcp is not None for s in r.steps)
    ]
    if not deciding:
        return []
    globals_ = list(settings.approvers)
    findings = []
    configured = [(who, "LOOM_OPS_APPROVERS") for who in globals_]
    configured += [(f"telegram:{i}", "TELEGRAM_APPROVER_IDS") for i in telegram_ids]
    for who, setting in configured:
        if all(r.approvers and not people.admits(who, r.approvers) for r in deciding):
            findings.append(
                Finding(
                    "warning",
                    "approvers",
                    f"{who} ({setting}) is accepted by no runbook: every one names its own "
                    f"approvers ({_names(deciding)}); add {who} to a runbook's approvers, or "
                    "remove it",
                )
            )
    if globals_ and telegram_ids:
        for i in telegram_ids:
            if not people.admits(f"telegram:{i}", globals_):
                findings.append(
                    Finding(
                        "warning",
                        "approvers",
                        f"telegram:{i} (TELEGRAM_APPROVER_IDS) is not in LOOM_OPS_APPROVERS: "
                        "its taps are refused",
                    )
                )
    for runbook in deciding:
        lists = [entries for entries in (globals_, runbook.approvers) if entries]
        if not lists:
            continue  # anyone may decide
        deciders = _admitted(people, persons, lists)
        if not deciders:
            findings.append(Finding("error", "approvers", _nobody_decides(runbook, globals_)))
        elif runbook.four_eyes and len(deciders) == 1:
            findings.append(_four_eyes_alone(people, persons, runbook, deciders[0]))
    for runbook in deciding:
        findings += _approval_rules(people, persons, runbook, globals_)
    if not findings:
        findings.append(
            Finding(
                "ok", "approvers", f"every runbook that asks has an approver: {_names(deciding)}"
            )
        )
    return findings


def _approval_rules(
    people: People, persons: Sequence[Person], runbook: Runbook, globals_: Sequence[str]
) -> list[Finding]:
    """Steps whose `approval: {required: N}` fewer than N configured people may satisfy (an
    error: their requests can only expire), or exactly N with four eyes (a warning: a run
    one of them starts can never get N)."""
    findings = []
    for step in runbook.steps:
        rule = step.approval_rule
        if rule is None or rule.required < 2:
            continue
        entries = rule.from_ or runbook.approvers
        lists = [e for e in (globals_, entries) if e]
        if not lists:
            continue  # anyone may approve: doctor cannot count them
        admitted = _admitted(people, persons, lists)
        if not admitted and not rule.from_:
            continue  # the runbook's approvers admit nobody: that error says it
        where = f"runbook {runbook.id} step {step.id} needs {rule.required} approvals"
        who = f"{len(admitted)} configured people ({', '.join(admitted) or 'none'})"
        if len(admitted) < rule.required:
            findings.append(
                Finding(
                    "error",
                    "approvers",
                    f"{where} by different people, but only {who} may give them "
                    f"({', '.join(entries) or 'LOOM_OPS_APPROVERS'}): add people to those "
                    "groups, or lower `required`",
                )
            )
        elif (rule.four_eyes or runbook.four_eyes) and len(admitted) == rule.required:
            findings.append(
                Finding(
                    "warning",
                    "approvers",
                    f"{where} with four eyes, and only {who} may give them: a run one of "
                    "them starts can never get them all; add another person",
                )
            )
    return findings


def _admitted(
    people: People, persons: Sequence[Person], lists: Sequence[Sequence[str]]
) -> list[str]:
    """The names of the configured people every one of `lists` admits: the people file's and
    the settings', and each identity a list names outright (a person of its own)."""
    named = [people.person(e) for entries in lists for e in entries if not _is_group(e)]
    admitted: dict[str, None] = {}  # a set that keeps the order people were named in
    for person in [*persons, *named]:
        identity = person.identities[0]
        if all(people.admits(identity, entries) for entries in lists):
            admitted[person.name] = None
    return list(admitted)


def _is_group(entry: str) -> bool:
    """Whether an approvers or starters entry names a group (`group:oncall`)."""
    return entry.startswith(GROUP_PREFIX)


def _nobody_decides(runbook: Runbook, globals_: Sequence[str]) -> str:
    """Why nobody may decide a runbook's requests, naming the list to fix."""
    head = f"nobody may decide runbook {runbook.id}'s requests:"
    if globals_ and runbook.approvers:
        return (
            f"{head} its approvers ({', '.join(runbook.approvers)}) are none of "
            f"LOOM_OPS_APPROVERS ({', '.join(globals_)})"
        )
    if globals_:
        return f"{head} no configured person is in LOOM_OPS_APPROVERS ({', '.join(globals_)})"
    return (
        f"{head} no configured person is in its approvers ({', '.join(runbook.approvers)}); "
        "add someone to them"
    )


def _four_eyes_alone(
    people: People, persons: Sequence[Person], runbook: Runbook, only: str
) -> Finding:
    """A four-eyes runbook that one person alone may decide: nobody may decide the runs that
    person starts. An error when its starters admit nobody else (every run would wait)."""
    starters = _admitted(people, persons, [runbook.starters]) if runbook.starters else None
    # Starters that admit nobody at all are the starters' own error, not this one's.
    severity: Severity = "error" if starters and set(starters) == {only} else "warning"
    return Finding(
        severity,
        "approvers",
        f"runbook {runbook.id} asks for four eyes, but only {only} may decide its requests: "
        f"nobody may decide a run {only} starts; add a second person to its approvers "
        f"({', '.join(runbook.approvers) or 'LOOM_OPS_APPROVERS'})",
    )


def _starters(
    people: People, persons: Sequence[Person], runbooks: Sequence[Runbook]
) -> list[Finding]:
    """Runbooks whose `starters` admit no configured person: every start is refused."""
    return [
        Finding(
            "error",
            "starters",
            f"nobody may start runbook {runbook.id}: no configured person is in its starters "
            f"({', '.join(runbook.starters)})",
        )
        for runbook in runbooks
        if runbook.starters and not _admitted(people, persons, [runbook.starters])
    ]


def _names(runbooks: Iterable[Runbook]) -> str:
    return ", ".join(r.id for r in runbooks)


def _telegram_approver_ids() -> list[int]:
    """TELEGRAM_APPROVER_IDS as the bot reads it; [] when unset or unreadable (reported by
    the Bot API check)."""
    from pydantic import ValidationError

    from bot.settings import TelegramSettings

    try:
        return list(TelegramSettings().approver_ids)
    except ValidationError:
        return []


# -- the LLM ------------------------------------------------------------------------------------


async def _llm(settings: Settings, redactor: Redactor, timeout: float) -> list[Finding]:
    """One tiny chat completion against the configured OpenAI-compatible API."""
    if settings.mock_llm:
        return [Finding("ok", "llm", "the mock policy (--mock-llm): no LLM is asked")]
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    if not key:
        return [
            Finding(
                "warning",
                "llm",
                "no LLM configured: runs need OPENAI_API_KEY (and OPENAI_BASE_URL for a local "
                "server) or --mock-llm",
            )
        ]
    base = (settings.openai_base_url or OPENAI_DEFAULT_BASE).rstrip("/")
    url = f"{base}/chat/completions"
    model = settings.openai_model
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Reply with: ok"}],
        "max_tokens": 1,
    }
    headers = {"Authorization": f"Bearer {key}"}
    import httpx  # only when there is a server to ask: it costs a start-up 50 ms

    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.post(url, json=body, headers=headers)
            if response.status_code == 400 and "max_tokens" in response.text:
                # Newer OpenAI models take only max_completion_tokens: a refusal of the
                # parameter says nothing about the configuration.
                body["max_completion_tokens"] = body.pop("max_tokens")
                response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return [
            Finding(
                "error",
                "llm",
                redactor.text(
                    f"LLM unreachable at {base}: {type(exc).__name__}: {exc or 'no answer'} "
                    f"(timeout {timeout:g} s); check OPENAI_BASE_URL and that the server runs"
                ),
            )
        ]
    return [Finding(*_llm_verdict(response, base, model, redactor))]


def _llm_verdict(
    response: httpx.Response, base: str, model: str, redactor: Redactor
) -> tuple[Severity, str, str]:
    """(severity, check, message) for the LLM's answer, naming the setting to fix."""
    status = response.status_code
    said = redactor.text(_said(response))
    if status == 200:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict) and "choices" in payload:
            return "ok", "llm", f"model {model!r} answers at {base}"
        return (
            "error",
            "llm",
            f"check OPENAI_BASE_URL: {base} answered with something that is not a chat "
            "completion (OpenAI-compatible servers usually end in /v1)",
        )
    if status in (401, 403):
        return "error", "llm", f"check OPENAI_API_KEY: {base} refused it (HTTP {status}: {said})"
    if status == 404 and "model" in said.lower():
        return "error", "llm", f"check OPENAI_MODEL: {base} has no model {model!r} ({said})"
    if status == 404:
        hint = "" if base.endswith("/v1") else "; OpenAI-compatible servers usually end in /v1"
        return "error", "llm", f"check OPENAI_BASE_URL: {base}/chat/completions is HTTP 404{hint}"
    if status == 429:
        return "warning", "llm", f"{base} is rate limiting (HTTP 429: {said}); the key works"
    if status >= 500:
        return "error", "llm", f"{base} fails (HTTP {status}: {said}); runs would be interrupted"
    return "error", "llm", f"{base} refused a test request for {model!r} (HTTP {status}: {said})"


def _said(response: httpx.Response) -> str:
    """A server's own words about an error, on one bounded line."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            body = error.get("message") or error
        elif isinstance(error, str):
            body = error
        else:
            body = body.get("message") or body.get("detail") or body.get("description") or body
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    text = " ".join(text.split()) or response.reason_phrase or "no message"
    return text if len(text) <= _MAX_SAID else text[:_MAX_SAID] + "…"


# -- the Telegram Bot API -----------------------------------------------------------------------


async def _telegram(settings: Settings, redactor: Redactor, timeout: float) -> list[Finding]:
    """The bot's settings as `loom-ops telegram` checks them, then one `getMe`."""
    if settings.telegram_bot_token is None:
        return []  # no bot here; the sandbox needs none
    from agent.frontends.serving import check_telegram

    try:
        config = check_telegram(settings)
    except ServingRefused as exc:
        return [Finding("error", "telegram", redactor.text(str(exc)))]
    base = config.settings.api_base_url
    url = f"{base}{config.token}/getMe"
    shown = f"{base}<token>/getMe"  # the token is in the URL: never print it
    import httpx  # only when there is a server to ask: it costs a start-up 50 ms

    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.get(url)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # an unusable URL too: one line
        detail = redactor.text(str(exc).replace(config.token, "<token>")) or "no answer"
        return [
            Finding(
                "error",
                "telegram",
                f"Bot API unreachable at {shown}: {type(exc).__name__}: {detail} "
                f"(timeout {timeout:g} s); check TELEGRAM_API_BASE_URL",
            )
        ]
    said = redactor.text(_said(response).replace(config.token, "<token>"))
    if response.status_code in (401, 404):
        # Telegram answers 401 for a revoked token and 404 for one it never issued.
        return [
            Finding(
                "error",
                "telegram",
                f"check TELEGRAM_BOT_TOKEN: {shown} answered HTTP {response.status_code} ({said})",
            )
        ]
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code != 200 or not isinstance(payload, dict) or not payload.get("ok"):
        return [
            Finding(
                "error",
                "telegram",
                f"{shown} did not answer as the Bot API does (HTTP {response.status_code}: "
                f"{said}); check TELEGRAM_API_BASE_URL",
            )
        ]
    me = payload.get("result") or {}
    name = f"@{me.get('username')}" if isinstance(me, dict) and me.get("username") else "the bot"
    return [Finding("ok", "telegram", f"{name} answers at {base}")]


def summary(findings: Sequence[Finding]) -> str:
    """`doctor: 1 error, 2 warnings`."""
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = sum(1 for f in findings if f.severity == "warning")
    return (
        f"doctor: {errors} error{'s' if errors != 1 else ''}, "
        f"{warnings} warning{'s' if warnings != 1 else ''}"
    )


def as_json(findings: Sequence[Finding]) -> dict[str, Any]:
    """The findings as `loom-ops doctor --json` prints them."""
    worst = next((s for s in SEVERITIES if any(f.severity == s for f in findings)), "ok")
    return {
        "run_id": None,
        "status": worst,
        "findings": [f.__dict__ for f in findings],
    }
