"""Benchmark of the HTTP API (`loom-ops serve` as its own process, mock policy).

Prints figures; asserts nothing. Run with `python bench/http.py [--runs 10000] [--streams 1000]`.

- SSE delivery latency: from an event's journal write (its `ts`, written by the server
  process) to its receipt by a client in this process, p50/p95, over supervised incidents
  streamed through `POST /supervise` and approved through the API;
- requests per second of `GET /runs/{id}` with `--runs` runs stored, from `--clients`
  concurrent keep-alive clients;
- the server's resident memory before and with `--streams` SSE streams open on a waiting run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py, as the issue asks; run as a script, its folder comes first on
# sys.path and would shadow the standard library's `http` package. Put the repo there instead.
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from agent.records import Origin, RunLimits  # noqa: E402
from agent.store import NewRun, RunStore  # noqa: E402

APPROVER = "cli:oncall"  # the API decides as this user, an approver (LOOM_OPS_APPROVERS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):6.2f} ms   p95 {p95:6.2f} ms   (n={len(values)})"


async def seed_runs(db: str, count: int) -> None:
    """`count` finished runs (created, then cancelled, so the server's recovery leaves them
    alone), written through the store before the server starts."""
    limits = RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600)
    async with await RunStore.open(db) as store:
        for n in range(count):
            await store.create_run(
                NewRun(
                    id=f"seed-{n:05d}",
                    role="runbook",
                    request="incident: seeded for the benchmark",
                    requested_by="cli:bench",
                    origin=Origin(kind="http"),
                    limits=limits,
                )
            )
            await store.cancel_run(f"seed-{n:05d}", "cli:bench")


async def sse_latency(client: httpx.AsyncClient, incidents: int) -> None:
    """Stream supervised incidents, approve each, and time every event's delivery."""
    latencies: list[float] = []
    for n in range(incidents):
        run_id = f"lat-{n}"
        body = {"message": "incident: API latency spike", "run_id": run_id}
        async with client.stream("POST", "/supervise", json=body) as stream:
            approved = False
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                received = time.time()
                event = json.loads(line[5:])
                latencies.append((received - event["ts"]) * 1000)
                if event["type"] == "approval_requested" and not approved:
                    approved = True
                    answer = await client.post(f"/runs/{run_id}/approve", json={})
                    answer.raise_for_status()
    print(f"SSE journal write -> client      {_percentiles(latencies)}")


async def get_rps(url: str, runs: int, clients: int, seconds: float) -> None:
    """Requests per second of GET /runs/{id} over random stored runs."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def one_client(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url) as client:
            n = k
            while time.perf_counter() < stop_at:
                answer = await client.get(f"/runs/seed-{n % runs:05d}")
                answer.raise_for_status()
                done += 1
                n += 7919  # a prime stride: spread over the table

    started = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    print(
        f"GET /runs/{{id}} with {runs} runs stored: {done / elapsed:7.0f} requests/s "
        f"({clients} clients, {elapsed:.1f} s; the client shares the 2 cores)"
    )


async def stream_memory(url: str, pid: int, streams: int) -> None:
    """Server RSS with `streams` SSE streams open on a run that waits for approval."""
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        body = {"message": "incident: API latency spike", "run_id": "mem-wait"}
        (await client.post("/runs", json=body)).raise_for_status()
        for _ in range(200):
            run = (await client.get("/runs/mem-wait")).json()
            if run["approval"]:
                break
            await asyncio.sleep(0.05)
        before = _rss_mib(pid)
        opened = 0
        ready = asyncio.Event()
        hold = asyncio.Event()

        async def one_stream() -> None:
            nonlocal opened
            async with client.stream("GET", "/runs/mem-wait/events") as stream:
                async for line in stream.aiter_lines():
                    if line == "event: approval_requested":  # caught up: the stream now idles
                        opened += 1
                        if opened == streams:
                            ready.set()
                        await hold.wait()
                        return

        tasks = [asyncio.create_task(one_stream()) for _ in range(streams)]
        await asyncio.wait_for(ready.wait(), 120)
        await asyncio.sleep(1)
        during = _rss_mib(pid)
        hold.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"server RSS: {before:.1f} MiB idle, {during:.1f} MiB with {streams} SSE streams "
        f"open ({(during - before) * 1024 / streams:.1f} KiB per stream)"
    )


async def main() -> None:
    """Start `loom-ops serve`, run the three measurements, stop it."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--incidents", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="loom-ops-bench-http-"))
    server = None
    try:
        shutil.copytree(REPO / "runbooks", directory / "runbooks")
        db = str(directory / "ops.sqlite")
        await seed_runs(db, args.runs)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
        env.update(
            LOOM_OPS_DB=db,
            LOOM_OPS_WORKSPACE=str(directory),
            LOOM_OPS_MOCK_LLM="1",
            LOOM_OPS_API_USER=APPROVER,
            LOOM_OPS_APPROVERS=APPROVER,  # the group the shipped runbooks name
            LOOM_OPS_MAX_ACTIVE_RUNS="1000",
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "agent.frontends.cli", "serve", "--port", str(port)],
            env=env,
            cwd=directory,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            await sse_latency(client, args.incidents)
        await get_rps(url, args.runs, args.clients, args.seconds)
        await stream_memory(url, server.pid, args.streams)
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
