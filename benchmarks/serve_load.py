"""The server under load: nlm serve in a subprocess, streamed completions from one and from 32
clients at once, and the memory that 1,000 open sessions take.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --tokens 300 --streams 32 --sessions 1000 --repeats 3

Serves the character model (runs/decode-char, trained here when missing, as in decode.py) and,
when present, the word-level ptb-small (runs/speed-ptb-small). For each model:
(a) one streamed /v1/completions alone: tokens/s measured by the client from the first to the
last content chunk, and the median gap between content chunks (inter-token latency);
(b) ``--streams`` such requests at once (asyncio + httpx): aggregate tokens/s, median
inter-token latency, errors; targets: aggregate >= 10x one stream's, median gap <= 2x one
stream's, no errors. For reference, the engine alone (Engine.step in this process, no server)
at batch 1 and 32. Then (c) the server's VmRSS before and after opening ``--sessions``
sessions (POST /v1/sessions with a short prompt) and after deleting them, beside the state
size per session (layers * parts * hidden * 4 bytes). The client runs on the same machine
as the server (its CPU time is reported). Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHAR = ("runs/decode-char",
        ["nlm", "train", "shakespeare-char-small", "--max-steps", "300", "--out", "runs/decode-char", "--no-progress"])
PTB = "runs/speed-ptb-small"
PROMPTS = {"char": "ROMEO:\n", "word": "the"}
SESSION_PROMPTS = {"char": "ROMEO:\nGood morrow, sweet.\n\n", "word": "the company said it expects to report"}
WARM_SESSIONS = 16  # opened and deleted before the "before" reading: first-use allocations (threads, kernels)


def rss_mb(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_checkpoint(path: str, command: list[str]) -> dict:
    while subprocess.run(["pgrep", "-f", f"out {path}"], capture_output=True).stdout.strip():
        print(f"waiting for the run training {path}", flush=True)
        time.sleep(10)
    if (ROOT / path / "model.safetensors").is_file():
        return {"checkpoint": path, "trained_here": False, "train_command": " ".join(command)}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return {"checkpoint": path, "trained_here": True, "train_command": " ".join(command)}


def median(values):
    return statistics.median(values) if values else float("nan")


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---- the engine alone, for comparison --------------------------------------------------------------------

def engine_alone(path: str, prompt: str, tokens: int, streams: int, repeats: int) -> dict:
    from neurallm.engine import Engine
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(ROOT / path, slots=1)
    out = {}
    for batch in (1, streams):
        engine = lm.engine if batch == 1 else Engine(lm.model, slots=batch)
        context = engine.prefill(lm.encode(prompt, "prompt"), lm.start())
        rates = []
        for r in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for i in range(batch):
                engine.submit(context, tokens, Sampling(1.0), seed=i + 100 * r)
            produced = 0
            while engine.streams:
                produced += len(engine.step())
            if r:
                rates.append(produced / (time.perf_counter() - t0))
        out[f"batch{batch}_tokens_per_s"] = median(rates)
        out[f"batch{batch}_step_ms"] = 1000 * batch / median(rates)
    return out


# ---- the client ------------------------------------------------------------------------------------------

async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    times, errors, usage = [], [], None
    sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        errors.append(obj["error"].get("message"))
                        continue
                    if obj.get("usage"):
                        usage = {**obj["usage"], **obj.get("timings", {})}
                    if any(c.get("text") for c in obj.get("choices", [])):
                        times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    if usage and usage.get("completion_tokens") != tokens:
        errors.append(f"{usage.get('completion_tokens')} tokens of {tokens}")
    return {"sent": sent, "times": times, "errors": errors, "usage": usage}


def summarize(results: list[dict]) -> dict:
    chunks = sum(len(r["times"]) for r in results)
    firsts = [r["times"][0] for r in results if r["times"]]
    lasts = [r["times"][-1] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    per_stream = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1]
    start = min(r["sent"] for r in results)
    return {
        "streams": len(results), "content_chunks": chunks,
        "completion_tokens": sum((r["usage"] or {}).get("completion_tokens", 0) for r in results),
        "errors": sum(len(r["errors"]) for r in results), "error_messages": [e for r in results for e in r["errors"]][:5],
        # tokens/s from the first content chunk of any stream to the last of any
        "tokens_per_s": (chunks - len(firsts)) / (max(lasts) - min(firsts)) if lasts else 0.0,
        # all tokens over the wall clock from the first request sent to the last chunk
        "tokens_per_s_wall": chunks / (max(lasts) - start) if lasts else 0.0,
        "tokens_per_s_per_stream_median": median(per_stream),
        "first_token_ms_median": 1000 * median([r["times"][0] - r["sent"] for r in results if r["times"]]),
        "first_token_ms_max": 1000 * max((r["times"][0] - r["sent"] for r in results if r["times"]), default=0.0),
        "inter_token_ms_median": 1000 * median(gaps), "inter_token_ms_p90": 1000 * quantile(gaps, 0.9),
        "inter_token_ms_p99": 1000 * quantile(gaps, 0.99), "inter_token_ms_max": 1000 * max(gaps, default=0.0),
        "server_tokens_per_s_median": median([r["usage"]["tokens_per_s"] for r in results
                                              if r["usage"] and "tokens_per_s" in r["usage"]]),
    }


async def load(client, model, prompt, tokens, streams, pid) -> dict:
    cpu_server, cpu_client = cpu_s(pid), time.process_time()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, model, prompt, tokens, seed=i) for i in range(streams)))
    wall = time.perf_counter() - t0
    out = summarize(results)
    out["wall_s"] = wall
    out["server_cpu_s"] = cpu_s(pid) - cpu_server
    out["client_cpu_s"] = time.process_time() - cpu_client
    return out


async def sessions_memory(client, model: str, prompt: str, count: int, pid: int) -> dict:
    limit = asyncio.Semaphore(8)
    errors = 0

    async def create(ids):
        nonlocal errors
        async with limit:
            r = await client.post("/v1/sessions", json={"model": model, "prompt": prompt})
            if r.status_code == 200:
                ids.append(r.json()["id"])
            else:
                errors += 1

    async def delete(sid):
        nonlocal errors
        async with limit:
            r = await client.delete(f"/v1/sessions/{sid}")
            errors += r.status_code != 200

    first = rss_mb(pid)
    warm: list[str] = []
    await asyncio.gather(*(create(warm) for _ in range(WARM_SESSIONS)))
    await asyncio.gather(*(delete(sid) for sid in warm))
    await asyncio.sleep(1.0)
    before = rss_mb(pid)
    ids: list[str] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(create(ids) for _ in range(count)))
    create_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    opened = rss_mb(pid)
    metrics = (await client.get("/metrics")).text
    gauge = next((float(line.split()[1]) for line in metrics.splitlines() if line.startswith("nlm_sessions ")), None)
    await asyncio.gather(*(delete(sid) for sid in ids))
    await asyncio.sleep(1.0)
    deleted = rss_mb(pid)
    return {"sessions": len(ids), "errors": errors, "sessions_gauge_when_open": gauge, "create_s": create_s,
            "rss_mb_before_warm_up": first, "warm_up_sessions": WARM_SESSIONS,
            "rss_mb_before": before, "rss_mb_with_sessions": opened, "rss_mb_after_delete": deleted,
            "growth_mb": opened - before, "growth_kb_per_session": 1024 * (opened - before) / max(1, len(ids)),
            "freed_mb": opened - deleted}


def state_bytes(path: str) -> dict:
    m = json.loads((ROOT / path / "config.json").read_text())["model"]
    parts = 2 if m["cell"] == "lstm" else 1
    dirs = 2 if m["bidirectional"] else 1
    return {"layers": m["num_layers"], "parts": parts, "hidden": m["hidden_size"],
            "bytes": m["num_layers"] * parts * dirs * m["hidden_size"] * 4}


async def drive(args, models: dict, pid: int, port: int) -> dict:
    out = {}
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        for name, (path, kind) in models.items():
            model = Path(path).name
            prompt = PROMPTS[kind]
            await load(client, model, prompt, 50, 1, pid)  # warm-up
            await load(client, model, prompt, 50, args.streams, pid)
            single, many = [], []
            for r in range(args.repeats):  # interleaved
                single.append(await load(client, model, prompt, args.tokens, 1, pid))
                many.append(await load(client, model, prompt, args.tokens, args.streams, pid))
                print(f"{name} repeat {r + 1}: one stream {single[-1]['tokens_per_s']:.0f} tokens/s, gap "
                      f"{single[-1]['inter_token_ms_median']:.2f} ms; {args.streams} streams "
                      f"{many[-1]['tokens_per_s']:.0f} tokens/s, gap {many[-1]['inter_token_ms_median']:.2f} ms, "
                      f"errors {many[-1]['errors']}; load {os.getloadavg()[0]:.1f}", flush=True)
            # the repeat with the median aggregate rate (so its figures belong together)
            pick = lambda runs: sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]  # noqa: E731
            one, all_ = pick(single), pick(many)
            out[name] = {
                "model": model, "checkpoint": path, "prompt": prompt, "tokens_per_stream": args.tokens,
                "one_stream": one, "concurrent": all_,
                "aggregate_over_one_stream": all_["tokens_per_s"] / one["tokens_per_s"], "target_aggregate": ">= 10",
                "gap_concurrent_over_one_stream": all_["inter_token_ms_median"] / one["inter_token_ms_median"],
                "target_gap": "<= 2",
                "errors_total": sum(r["errors"] for r in single + many), "target_errors": 0,
                "runs": {"one_stream_tokens_per_s": [r["tokens_per_s"] for r in single],
                         "one_stream_inter_token_ms": [r["inter_token_ms_median"] for r in single],
                         "concurrent_tokens_per_s": [r["tokens_per_s"] for r in many],
                         "concurrent_inter_token_ms": [r["inter_token_ms_median"] for r in many]},
            }
        sessions = {}
        for name, (path, kind) in models.items():
            mem = await sessions_memory(client, Path(path).name, SESSION_PROMPTS[kind], args.sessions, pid)
            state = state_bytes(path)
            sessions[name] = {**mem, "prompt": SESSION_PROMPTS[kind], "state": state,
                              "state_mb_all_sessions": state["bytes"] * mem["sessions"] / 2**20,
                              "growth_over_state": (mem["growth_mb"] * 2**20) / max(1, state["bytes"] * mem["sessions"])}
        out["sessions"] = sessions
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ptb", action="store_true", help="serve the character model only")
    args = parser.parse_args()
    from common import write

    started = time.perf_counter()
    trained = ensure_checkpoint(*CHAR)
    models = {"char": (CHAR[0], "char")}
    if not args.no_ptb and (ROOT / PTB / "model.safetensors").is_file():
        models["ptb"] = (PTB, "word")
    alone = {name: engine_alone(path, PROMPTS[kind], args.tokens, args.streams, args.repeats)
             for name, (path, kind) in models.items()}

    port = free_port()
    cmd = ["nlm", "serve", *[path for path, _ in models.values()], "--port", str(port), "--slots", str(args.streams)]
    print("$", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"the server did not start: {server.stdout.read() if server.poll() is not None else ''}")
            time.sleep(0.5)
        rss_idle = rss_mb(server.pid)
        figures = asyncio.run(drive(args, models, server.pid, port))
        peak = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{server.pid}/status").read_text()
                     .splitlines() if line.startswith("VmHWM:")), None)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    for name in alone:
        f = figures[name]
        f["engine_alone"] = alone[name]
        f["server_over_engine_one_stream"] = f["one_stream"]["tokens_per_s"] / alone[name]["batch1_tokens_per_s"]
        f["server_over_engine_concurrent"] = (f["concurrent"]["tokens_per_s"]
                                              / alone[name][f"batch{args.streams}_tokens_per_s"])
    write("serve", {
        "server_command": " ".join(cmd), "checkpoint": trained, "streams": args.streams, "repeats": args.repeats,
        "benchmark_seconds": time.perf_counter() - started, "load_average_end": os.getloadavg(),
        "meaning": {
            "one_stream": "one streamed POST /v1/completions (temperature 1, max_tokens = tokens_per_stream) alone; "
                          "tokens_per_s: content chunks after the first over the time from the first to the last "
                          "(client clock); inter_token_ms_*: gaps between consecutive content chunks; "
                          "server_tokens_per_s_median: the server's own timings.tokens_per_s (include_usage)",
            "concurrent": "`streams` such requests sent at once from one asyncio client (httpx.AsyncClient), "
                          "seeds 0..streams-1; tokens_per_s: all content chunks but each stream's first, from "
                          "the first content chunk of any stream to the last of any; tokens_per_s_wall: all chunks "
                          "from the first request sent; gaps pooled over all streams; server_cpu_s/client_cpu_s: "
                          "CPU seconds each process used during the run (they share the machine's cores)",
            "figures per model": "the repeat with the median aggregate tokens/s of `repeats`; runs: every repeat",
            "engine_alone": "Engine.step in the benchmark process before the server starts, same model and prompt, "
                            "temperature 1: tokens/s at batch 1 and at batch `streams`, and ms per step",
            "sessions": "server VmRSS (/proc/PID/status) before opening the sessions (after a warm-up: "
                        "warm_up_sessions opened and deleted; rss_mb_before_warm_up is the reading before that), "
                        "with them open (POST /v1/sessions with a short prompt, 8 at a time), and after DELETE of "
                        "each; state.bytes = layers * parts * hidden * 4, the recurrent state a session keeps; "
                        "growth_over_state = RSS growth / (sessions * state.bytes)",
        },
        "server_rss_mb_idle": rss_idle, "server_peak_rss_mb": peak, **figures,
    })


if __name__ == "__main__":
    main()
