"""The deploy files (deploy/, .dockerignore, README "Deploying") against the code they run.

Nothing here needs Docker or systemd as PID 1: the Compose file and the Dockerfile are parsed,
the units go through `systemd-analyze verify` where that works, and every `loom-ops` command
and flag any of them invokes must be one the installed CLI accepts (`<command> --help`).
The `slow` test replays the Dockerfile's build commands in a fresh venv.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

from agent.settings import Settings
from bot.settings import TelegramSettings
from tests.cli_helpers import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse deploy/compose.yaml")

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
UNITS = ("loom-ops-worker@.service", "loom-ops-api.service", "loom-ops-bot.service")
LOOM_SERVICES = ("bot", "worker", "api")
ENV_FILE = "/etc/loom-ops/loom-ops.env"
# The installed CLI of the environment running the tests (.venv/bin/loom-ops under `make test`).
LOOM_OPS = Path(sys.executable).with_name("loom-ops")
SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSWORD|PASS$|API_KEY|PRIVATE", re.IGNORECASE)
INTERPOLATION = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(?:(?::?[-?])[^}]*)?\}$")


# ---- parsing helpers --------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, rest))
    return stages


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in stage:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
        lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument of CMD / HEALTHCHECK CMD; fails on the shell form."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def instruction(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


@cache
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    value = service.get("command")
    return shlex.split(value) if isinstance(value, str) else list(value or [])


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}}: systemd keys may repeat (Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


@cache
def deploying_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.find("\n## Deploying\n")
    layout = text.find("\n## Layout\n")
    assert start != -1, 'README.md has no "## Deploying" section'
    assert layout != -1 and start < layout, '"## Deploying" must come just before "## Layout"'
    between = text[start + 1 : layout]
    assert "\n## " not in between.partition("\n")[2], '"## Deploying" must be next to "## Layout"'
    return between


def readme_install_prefix() -> str:
    """The venv the README's VM install creates (`python3.11 -m venv <prefix>`)."""
    match = re.search(r"-m venv (/\S+)", deploying_section())
    assert match, "the Deploying section has no `python -m venv /path` install step"
    return match.group(1)


# ---- the `loom-ops` invocations of every deploy file -------------------------------------------


def loom_ops_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `loom-ops`) for each command the deploy files and README run."""
    found: list[tuple[str, list[str]]] = []

    final = dockerfile_stages()[-1]
    for rest in instruction(final, "CMD"):
        found.append(("Dockerfile CMD", exec_form(rest)))
    for rest in instruction(final, "HEALTHCHECK"):
        found.append(("Dockerfile HEALTHCHECK", exec_form(rest.split(" CMD ", 1)[-1])))

    for name, service in compose()["services"].items():
        if command(service):
            found.append((f"compose {name} command", command(service)))
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] == "CMD":
            found.append((f"compose {name} healthcheck", test[1:]))

    for path in sorted(SYSTEMD.glob("*.service")):
        for line in parse_unit(path).get("Service", {}).get("ExecStart", []):
            found.append((f"{path.name} ExecStart", shlex.split(line.lstrip("-@:+!"))))

    for block in re.findall(r"^```sh\n(.*?)^```", deploying_section(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            # A command line (possibly after sudo or inside `sh -c '...'`) that runs loom-ops.
            for match in re.finditer(r"(?:^|[\s;'])(\S*/)?loom-ops (?=[a-z])([^;'#&|]*)", line):
                found.append(("README Deploying", ["loom-ops", *shlex.split(match.group(2))]))

    invocations = []
    for where, argv in found:
        if argv and Path(argv[0]).name == "loom-ops":
            invocations.append((where, argv[1:]))
    return invocations


def cli_help(subcommand: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOOM_OPS), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_every_invoked_command_and_flag_is_one_the_cli_accepts():
    assert LOOM_OPS.exists(), f"{LOOM_OPS} is missing: install the project (make test does)"
    invocations = loom_ops_invocations()
    wanted: dict[str, dict[str, set[str]]] = {}
    for where, args in invocations:
        assert args, f"{where}: `loom-ops` without a command"
        flags = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("--")}
        for flag in flags:
            wanted.setdefault(args[0], {}).setdefault(flag, set()).add(where)
        wanted.setdefault(args[0], {})
    # What the brief's deploy surface needs at the least, wherever it is invoked from.
    for subcommand in ("worker", "serve", "telegram", "healthcheck"):
        assert subcommand in wanted, f"no deploy file runs `loom-ops {subcommand}`"
    assert "--no-worker" in wanted["serve"] and "--no-worker" in wanted["telegram"]
    assert "--url" in wanted["healthcheck"]

    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        helps = dict(zip(wanted, pool.map(cli_help, wanted), strict=True))
    problems = []
    for subcommand, flags in sorted(wanted.items()):
        result = helps[subcommand]
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            problems.append(f"`loom-ops {subcommand} --help` exits {result.returncode}: {last}")
            continue
        for flag, where in sorted(flags.items()):
            # argparse stops at --help and never rejects a later unknown flag: read the usage.
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout):
                problems.append(f"`loom-ops {subcommand}` has no {flag} (used by {sorted(where)})")
    assert not problems, "\n".join(problems)


def known_env_names() -> set[str]:
    names = set()
    for model in (Settings, TelegramSettings):
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            alias = field.validation_alias
            if alias is not None and hasattr(alias, "choices"):
                names.update(str(choice).upper() for choice in alias.choices)
            else:
                names.add(f"{prefix}{name}".upper())
    return names


def test_settings_the_deploy_files_set_are_real_settings():
    known = known_env_names()
    used: dict[str, str] = {}
    for name in LOOM_SERVICES:
        for key in environment(compose()["services"][name]):
            used[key] = f"compose {name}"
    final = dockerfile_stages()[-1]
    for rest in instruction(final, "ENV"):
        for key in re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", rest):
            used[key] = "Dockerfile ENV"
    for unit in UNITS:
        for line in parse_unit(SYSTEMD / unit)["Service"].get("Environment", []):
            for key in re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", line):
                used[key] = unit
    outside = {"PATH", "HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    unknown = {k: v for k, v in used.items() if k not in known and k not in outside}
    assert not unknown, f"not settings of agent/ or bot/settings.py: {unknown}"


# ---- Compose -----------------------------------------------------------------------------------


def test_compose_services_and_their_commands():
    services = compose()["services"]
    assert set(services) >= {"postgres", *LOOM_SERVICES}, sorted(services)
    assert command(services["bot"])[:3] == ["loom-ops", "telegram", "--no-worker"]
    assert command(services["api"])[:3] == ["loom-ops", "serve", "--no-worker"]
    assert command(services["worker"])[:2] == ["loom-ops", "worker"]
    worker_services = [s for s in services.values() if command(s)[1:2] == ["worker"]]
    replicas = sum(int((s.get("deploy") or {}).get("replicas", 1)) for s in worker_services)
    assert replicas >= 2, f"two workers wanted, the file runs {replicas}"


def test_compose_postgres_has_a_volume_and_a_healthcheck():
    data = compose()
    postgres = data["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[56](\.\d+)*(-\w+)?", postgres["image"]), postgres["image"]
    mounts = [str(v).split(":") for v in postgres.get("volumes", [])]
    assert any(m[-1] == "/var/lib/postgresql/data" and m[0] in data["volumes"] for m in mounts)
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))


def test_compose_loom_services_share_env_file_build_and_wait_for_healthy_postgres():
    for name in LOOM_SERVICES:
        service = compose()["services"][name]
        env_files = service.get("env_file")
        env_files = [env_files] if isinstance(env_files, str | dict) else env_files or []
        paths = [(f["path"] if isinstance(f, dict) else f) for f in env_files]
        assert REPO / ".env" in {(DEPLOY / p).resolve() for p in paths}, (name, paths)
        build = service["build"]
        assert (DEPLOY / build["context"]).resolve() == REPO, (name, build)
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE, (name, build)
        depends = service.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form"
        assert depends["postgres"]["condition"] == "service_healthy", name


def test_compose_database_url_matches_the_postgres_service():
    services = compose()["services"]
    pg_env = environment(services["postgres"])
    user, db = pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"]
    password = pg_env["POSTGRES_PASSWORD"]
    assert INTERPOLATION.match(password), "POSTGRES_PASSWORD must come from .env"
    variable = re.match(r"\$\{(\w+)", password).group(1)
    for name in LOOM_SERVICES:
        url = environment(services[name]).get("LOOM_OPS_DB", "")
        match = re.fullmatch(r"postgresql://([^:@/]+):(\$\{[^}]+\})@postgres:5432/(\w+)", url)
        assert match, f"{name}: LOOM_OPS_DB {url!r} is not the postgres service"
        assert match.group(1) == user and match.group(3) == db, (name, url)
        assert match.group(2).startswith("${" + variable), (name, url)


def test_compose_api_binds_all_interfaces_with_a_token_and_checks_its_healthz():
    api = compose()["services"]["api"]
    env = environment(api)
    assert env["LOOM_OPS_HOST"] == "0.0.0.0"
    assert INTERPOLATION.match(env.get("LOOM_OPS_API_TOKEN", "")), "the API needs its token"
    port = env.get("LOOM_OPS_PORT", "8766")
    assert any(str(p).split(":")[-1] == port for p in api.get("ports", [])), api.get("ports")
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "loom-ops", "healthcheck"]
    assert test[test.index("--url") + 1] == f"http://127.0.0.1:{port}/healthz"


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")
    else:
        yield path, node


def test_compose_writes_no_secret():
    problems = []
    for name, service in compose()["services"].items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key) and not INTERPOLATION.match(value):
                problems.append(f"{name}: {key} is written in the file")
    for path, value in walk(compose()):
        text = str(value)
        for credentials in re.findall(r"://[^/\s:@]+:([^@\s]*)@", text):
            if not INTERPOLATION.match(credentials):
                problems.append(f"{path}: a password in a URL")
        if re.search(r"\b\d{6,}:[A-Za-z0-9_-]{30,}|\bsk-[A-Za-z0-9_-]{16,}", text):
            problems.append(f"{path}: looks like a token")
    assert not problems, problems


# ---- Dockerfile and .dockerignore --------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_311_slim():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim", stage[0]
    builder = stages[0][0][1].split()
    assert len(builder) == 3 and builder[1].upper() == "AS", "the builder stage needs a name"
    copies = instruction(stages[-1], "COPY")
    assert any(f"--from={builder[2]}" in rest for rest in copies), "nothing taken from builder"


def test_dockerfile_runs_as_a_fixed_non_root_user_with_healthcheck_and_worker_cmd():
    final = dockerfile_stages()[-1]
    values = arg_defaults(final)
    users = instruction(final, "USER")
    assert users, "the final stage has no USER: it would run as root"
    user = substitute(users[-1], values).split(":")[0]
    assert user not in {"root", "0", ""} and "$" not in user, users[-1]
    created = [substitute(r, values) for r in instruction(final, "RUN") if "useradd" in r]
    assert created, "the final stage creates no user"
    uid = re.search(r"--uid\s+\"?(\d+)", created[0])
    assert uid and int(uid.group(1)) >= 1000 and " loom" in created[0], created[0]
    assert user in {uid.group(1), "loom"}, (user, uid.group(1))
    healthchecks = instruction(final, "HEALTHCHECK")
    assert len(healthchecks) == 1
    assert exec_form(healthchecks[0].split(" CMD ", 1)[1]) == ["loom-ops", "healthcheck"]
    assert exec_form(instruction(final, "CMD")[-1]) == ["loom-ops", "worker"]


def test_readme_builds_with_podman_in_the_format_that_keeps_the_healthcheck():
    """The OCI format has no HEALTHCHECK and podman builds OCI by default: every podman build
    the README shows asks for Docker's format, and its extension example starts from the image
    and ends as the image's user."""
    assert instruction(dockerfile_stages()[-1], "HEALTHCHECK"), "nothing to keep"
    section = deploying_section()
    builds = re.findall(r"podman build -[^`\n]*", section)  # the commands, not the prose
    assert builds and all("--format docker" in b for b in builds), builds
    assert "BUILDAH_FORMAT=docker" in section
    extension = re.search(r"```dockerfile\n(.*?)```", section, re.S)
    assert extension, "no example of extending the image"
    lines = extension.group(1).strip().splitlines()
    uid = arg_defaults(dockerfile_stages()[-1])["LOOM_UID"]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    tags = {service.get("image") for service in compose["services"].values()}
    base = lines[0].removeprefix("FROM ")
    assert base in tags and lines[-1].startswith(f"USER {uid}"), (lines, tags)
    # What it copies from the repository root gets through .dockerignore.
    copied = [
        name.rstrip("/")
        for line in lines
        if line.startswith("COPY ")
        for name in line.split()[1:-1]
    ]
    patterns = (REPO / ".dockerignore").read_text().splitlines()
    for name in copied:
        assert f"!{name}" in patterns or f"!{name}/" in patterns, f".dockerignore drops {name}"


def test_dockerfile_workspace_holds_runbooks_and_allowlist():
    final = dockerfile_stages()[-1]
    workdir = instruction(final, "WORKDIR")[-1]
    env = " ".join(instruction(final, "ENV"))
    assert f"LOOM_OPS_WORKSPACE={workdir}" in env, "LOOM_OPS_WORKSPACE must be the WORKDIR"
    sources = {src for rest in instruction(final, "COPY") for src in rest.split()[:-1]}
    for needed in ("runbooks/", "ops.shell.allowlist.json"):
        assert needed in sources, f"the final stage does not copy {needed}"
        assert (REPO / needed).exists()


def test_dockerfile_copies_what_pyproject_builds_and_dockerignore_lets_it_through():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {pattern.rstrip("*").split(".")[0] for pattern in include}
    copied = set()
    for stage in dockerfile_stages():
        for rest in instruction(stage, "COPY"):
            parts = rest.split()
            if not any(p.startswith("--from") for p in parts):
                copied |= {p.rstrip("/") for p in parts[:-1] if not p.startswith("--")}
    missing = needed - copied
    assert not missing, f"the Dockerfile does not copy {sorted(missing)}"

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(name: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            if fnmatch.fnmatchcase(name, bare):
                verdict = not negate
        return verdict

    let_out = sorted(name for name in copied if ignored(name))
    assert not let_out, f".dockerignore leaves out what the Dockerfile copies: {let_out}"
    for secret in (".env", "ops.sqlite", ".venv", ".git"):
        assert ignored(secret), f".dockerignore lets {secret} into the build context"


# ---- systemd units -----------------------------------------------------------------------------


def test_units_settings_hardening_and_paths_match_the_readme():
    prefix = readme_install_prefix()
    section = deploying_section()
    assert ENV_FILE in section, f"the README does not install {ENV_FILE}"
    for name in UNITS:
        assert f"{name.removesuffix('.service').removesuffix('@')}" in section, name
        unit = parse_unit(SYSTEMD / name)
        service = unit["Service"]
        assert one(unit, "Service", "User") not in {"root", "0"}
        assert one(unit, "Service", "EnvironmentFile").lstrip("-") == ENV_FILE
        exec_start = shlex.split(one(unit, "Service", "ExecStart"))
        assert exec_start[0] == f"{prefix}/bin/loom-ops", (name, exec_start[0], prefix)
        workdir = one(unit, "Service", "WorkingDirectory")
        assert workdir in section, f"{name}: WorkingDirectory {workdir} is not in the README"
        assert f"LOOM_OPS_WORKSPACE={workdir}" in service.get("Environment", [])
        writable = " ".join(service.get("ReadWritePaths", [])).split()
        assert writable and all(p.lstrip("-").startswith(workdir + "/") for p in writable)
        expected = {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "PrivateTmp": "yes",
            "Restart": "on-failure",
            "KillSignal": "SIGTERM",
        }
        for key, value in expected.items():
            assert one(unit, "Service", key) == value, (name, key)
        assert re.fullmatch(r"\d+s?", one(unit, "Service", "TimeoutStopSec")), name
        assert one(unit, "Install", "WantedBy") in {"multi-user.target", "loom-ops.target"}
    worker = parse_unit(SYSTEMD / "loom-ops-worker@.service")
    assert shlex.split(one(worker, "Service", "ExecStart"))[1] == "worker"
    assert re.search(r"loom-ops-worker@1\b.*loom-ops-worker@2\b", section, re.S)


def test_units_pass_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed; the unit settings are checked by parsing")
    # verify insists that ExecStart's binary exists: stand one in for the installed venv.
    stub = tmp_path / "prefix" / "bin" / "loom-ops"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    prefix = readme_install_prefix()
    units = tmp_path / "units"
    units.mkdir()
    for path in SYSTEMD.iterdir():
        text = path.read_text().replace(f"{prefix}/bin/loom-ops", str(stub))
        (units / path.name).write_text(text)
    # First a unit known to be good: if even that fails, verify cannot run in this container.
    probe = units / "probe-loom-ops.service"
    probe.write_text(f"[Service]\nType=exec\nExecStart={stub}\n")
    result = subprocess.run(
        [tool, "verify", "--man=no", str(probe)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {result.stderr.strip()[:200]}")
    probe.unlink()
    result = subprocess.run(
        [tool, "verify", "--man=no", *sorted(str(p) for p in units.iterdir())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if re.search(r"Unknown|Failed|invalid|not executable|Ignoring", line, re.I)
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# ---- the image's build commands in a plain venv (slow) -----------------------------------------


def builder_commands(venv: Path) -> list[list[str]]:
    """The builder stage's RUN commands after its first COPY, aimed at `venv`."""
    builder = dockerfile_stages()[0]
    venvs = [r for kw, r in builder if kw == "RUN" and " -m venv " in f" {r} "]
    assert venvs, "the builder stage creates no venv"
    target = shlex.split(venvs[0])[-1]
    commands = []
    for keyword, rest in builder:
        if keyword != "RUN" or rest in venvs:
            continue
        for part in rest.split("&&"):
            argv = shlex.split(part.replace(target, str(venv)))
            argv = [arg for arg in argv if arg not in {">/dev/null", "2>&1"}]
            if argv[1:2] == ["install"] and Path(argv[0]).name.startswith("pip"):
                # Offline-friendly: the dependencies come from the test venv (see below).
                argv[2:2] = ["--no-deps", "--no-build-isolation", "--no-index"]
            commands.append(argv)
    assert any("install" in argv for argv in commands), "the builder installs nothing"
    return commands


@pytest.mark.slow
def test_dockerfile_build_commands_work_in_a_fresh_venv(tmp_path):
    builder = dockerfile_stages()[0]
    # The build context as the builder sees it: only what the builder COPYs.
    src = tmp_path / "src"
    src.mkdir()
    for rest in instruction(builder, "COPY"):
        *sources, dest = rest.split()
        base = src / dest  # the builder's WORKDIR is the context's root
        for source in sources:
            origin = REPO / source
            if origin.is_dir():  # COPY copies a directory's contents into dest
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(origin, base, ignore=ignore, dirs_exist_ok=True)
            elif dest.endswith("/"):
                base.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, base / origin.name)
            else:
                shutil.copy2(origin, base)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # Without build isolation the backend must be in the venv; pyproject wants setuptools>=68.
    backend = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "setuptools>=68", "wheel"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if backend.returncode != 0:
        pytest.skip(f"no package index for the build backend: {backend.stderr.strip()[-200:]}")
    # The runtime dependencies: those of this test environment, after the venv's own.
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    for argv in builder_commands(venv):
        result = subprocess.run(argv, cwd=src, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv}: {result.stdout[-500:]}{result.stderr[-2000:]}"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import agent, bot; print(agent.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), f"agent imported from {where}, not the new venv"
    result = subprocess.run(
        [str(venv / "bin" / "loom-ops"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: loom-ops" in result.stdout, result.stderr


def test_a_workers_stop_timeout_outlasts_its_drain():
    """systemd and Compose kill a worker that has not stopped in time: they must wait longer
    than it lets its steps in flight end (LOOM_OPS_DRAIN_SECONDS), with time to hand the runs
    back after, or every rolling restart leaves those steps in doubt."""
    drain = Settings.model_fields["drain_seconds"].default
    unit = one(parse_unit(SYSTEMD / "loom-ops-worker@.service"), "Service", "TimeoutStopSec")
    grace = compose()["services"]["worker"]["stop_grace_period"]
    for where, timeout in (("systemd TimeoutStopSec", unit), ("compose stop_grace_period", grace)):
        assert re.fullmatch(r"\d+s?", timeout), (where, timeout)
        assert int(timeout.removesuffix("s")) >= drain + 10, (where, timeout, drain)
