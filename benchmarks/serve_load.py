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
WARM_SESSIONS = 64  # opened and deleted before the "before" reading: first-use allocations (threads, kernels)


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
    while subprocess.run(["pgrep", "-f", f"out {path}"], capture_output=True, check=False).stdout.strip():
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
    import torch

    from neurallm.engine import Engine
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    try:  # the server's own thread count for its decoding step
        from neurallm.serve.app import decode_threads
        threads = decode_threads()
    except ImportError:
        threads = torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    lm = Loaded.open(ROOT / path, slots=1)
    out = {"torch_threads": threads}
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
    torch.set_num_threads(previous)
    return out


# ---- the client ------------------------------------------------------------------------------------------

def count_tokens(kind: str, text: str) -> int:
    """Tokens in a piece of streamed text (an event may carry several: the server coalesces under
    load): one per character for a character model; a word model writes each token as "word",
    " word" or a line end, with no stop strings in these requests."""
    return len(text) if kind == "char" else len(text.split()) + text.count("\n")


class Tally:
    """What one streamed completion brought: when each text event arrived and how many tokens it held."""

    def __init__(self, kind: str, tokens: int):
        self.kind, self.tokens = kind, tokens
        self.sent = time.perf_counter()
        self.times, self.counts, self.errors, self.usage = [], [], [], None
        self.done = False

    def event(self, data: str, now: float) -> None:
        """One SSE ``data:`` payload."""
        if data == "[DONE]":
            self.done = True
            return
        obj = json.loads(data)
        if "error" in obj:
            self.errors.append(obj["error"].get("message"))
            return
        if obj.get("usage"):
            self.usage = {**obj["usage"], **obj.get("timings", {})}
        text = "".join(c.get("text") or "" for c in obj.get("choices", []))
        if text:
            self.times.append(now)
            self.counts.append(count_tokens(self.kind, text))

    def result(self) -> dict:
        if not self.errors:
            if not self.done:
                self.errors.append("the stream ended without [DONE]")
            elif self.usage and self.usage.get("completion_tokens") != self.tokens:
                self.errors.append(f"{self.usage.get('completion_tokens')} tokens of {self.tokens}")
            elif sum(self.counts) != self.tokens:
                self.errors.append(f"counted {sum(self.counts)} tokens in the text of {self.tokens}")
        return {"sent": self.sent, "times": self.times, "counts": self.counts, "errors": self.errors,
                "usage": self.usage}


def completion_body(model: str, prompt: str, tokens: int, seed: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_httpx(client: httpx.AsyncClient, model: str, kind: str, prompt: str, tokens: int,
                       seed: int) -> dict:
    tally = Tally(kind, tokens)
    try:
        async with client.stream("POST", "/v1/completions", json=completion_body(model, prompt, tokens, seed)) as r:
            if r.status_code != 200:
                tally.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            else:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        tally.event(line[6:], time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        tally.errors.append(f"{type(e).__name__}: {e}")
    return tally.result()


async def stream_raw(port: int, model: str, kind: str, prompt: str, tokens: int, seed: int) -> dict:
    """The same request over a bare asyncio connection (HTTP/1.1, chunked body parsed by hand): a client
    that takes little CPU from a server on the same cores."""
    tally = Tally(kind, tokens)
    body = json.dumps(completion_body(model, prompt, tokens, seed)).encode()
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if status != 200:
            tally.errors.append(f"HTTP {status}: {(await reader.read(200))!r}")
            return tally.result()
        chunked = headers.get("transfer-encoding") == "chunked"
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        tally.event(line[6:].decode(), now)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        tally.errors.append(f"{type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()
    return tally.result()


def summarize(results: list[dict]) -> dict:
    events = sum(len(r["times"]) for r in results)
    tokens = sum(sum(r["counts"]) for r in results)
    firsts = [r["times"][0] for r in results if r["times"]]
    lasts = [r["times"][-1] for r in results if r["times"]]
    # the gap before each event that brings text, and that gap spread over the tokens it brings
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    spread = [(b - a) / k for r in results for a, b, k in zip(r["times"], r["times"][1:], r["counts"][1:])
              for _ in range(k)]
    per_stream = [(sum(r["counts"]) - r["counts"][0]) / (r["times"][-1] - r["times"][0]) for r in results
                  if len(r["times"]) > 1]
    start = min(r["sent"] for r in results)
    after_first = tokens - sum(r["counts"][0] for r in results if r["counts"])
    return {
        "streams": len(results), "tokens": tokens, "text_events": events,
        "tokens_per_event": tokens / events if events else 0.0,
        "completion_tokens": sum((r["usage"] or {}).get("completion_tokens", 0) for r in results),
        "errors": sum(len(r["errors"]) for r in results), "error_messages": [e for r in results for e in r["errors"]][:5],
        # tokens after each stream's first event, from the first event of any stream to the last of any
        "tokens_per_s": after_first / (max(lasts) - min(firsts)) if lasts else 0.0,
        # all tokens over the wall clock from the first request sent to the last event
        "tokens_per_s_wall": tokens / (max(lasts) - start) if lasts else 0.0,
        "tokens_per_s_per_stream_median": median(per_stream),
        "first_token_ms_median": 1000 * median([r["times"][0] - r["sent"] for r in results if r["times"]]),
        "first_token_ms_max": 1000 * max((r["times"][0] - r["sent"] for r in results if r["times"]), default=0.0),
        "inter_token_ms_median": 1000 * median(gaps), "inter_token_ms_p90": 1000 * quantile(gaps, 0.9),
        "inter_token_ms_p99": 1000 * quantile(gaps, 0.99), "inter_token_ms_max": 1000 * max(gaps, default=0.0),
        "per_token_spacing_ms_median": 1000 * median(spread),
        "server_tokens_per_s_median": median([r["usage"]["tokens_per_s"] for r in results
                                              if r["usage"] and "tokens_per_s" in r["usage"]]),
    }


async def load(client, port, model, kind, prompt, tokens, streams, pid) -> dict:
    cpu_server, cpu_client = cpu_s(pid), time.process_time()
    t0 = time.perf_counter()
    if client is None:
        calls = (stream_raw(port, model, kind, prompt, tokens, seed=i) for i in range(streams))
    else:
        calls = (stream_httpx(client, model, kind, prompt, tokens, seed=i) for i in range(streams))
    results = await asyncio.gather(*calls)
    wall = time.perf_counter() - t0
    out = summarize(results)
    out["wall_s"] = wall
    out["server_cpu_s"] = cpu_s(pid) - cpu_server
    out["client_cpu_s"] = time.process_time() - cpu_client
    return out


async def sessions_memory(client, models: dict, count: int, series: int, pid: int, settle: float) -> dict:
    """Open ``count`` sessions per model, one model after the other, reading VmRSS between; then
    delete them all. (Memory freed by deleting goes back to the allocator, not to the system, so
    a model measured after a deletion would reuse it: nothing is deleted until the end.)"""
    limit = asyncio.Semaphore(8)
    errors = 0

    async def create(model, prompt, ids):
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

    out = {"rss_mb_before_warm_up": rss_mb(pid), "warm_up_sessions_per_model": WARM_SESSIONS}
    warm: list[str] = []
    for path, kind in models.values():
        await asyncio.gather(*(create(Path(path).name, SESSION_PROMPTS[kind], warm) for _ in range(WARM_SESSIONS)))
    await asyncio.gather(*(delete(sid) for sid in warm))
    await asyncio.sleep(settle)
    out["rss_mb_before"] = before = rss_mb(pid)
    every = []
    for n, (name, (path, kind)) in enumerate(models.items()):
        ids: list[str] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(create(Path(path).name, SESSION_PROMPTS[kind], ids) for _ in range(count)))
        create_s = time.perf_counter() - t0
        await asyncio.sleep(settle)
        now = rss_mb(pid)
        state = state_bytes(path)
        out[name] = {"sessions": len(ids), "prompt": SESSION_PROMPTS[kind], "create_s": create_s,
                     "rss_mb_before": before, "rss_mb_after": now, "growth_mb": now - before,
                     "growth_kb_per_session": 1024 * (now - before) / max(1, len(ids)), "state": state,
                     "state_mb_all_sessions": state["bytes"] * len(ids) / 2**20,
                     "growth_over_state": (now - before) * 2**20 / max(1, state["bytes"] * len(ids))}
        if n == 0 and series > count:
            # More of the same, VmRSS after each `count`: the slope is the memory one more session takes,
            # past whatever slack the heap had at the start.
            points = [(0, before), (len(ids), now)]
            while len(ids) < series:
                await asyncio.gather(*(create(Path(path).name, SESSION_PROMPTS[kind], ids) for _ in range(count)))
                await asyncio.sleep(settle)
                points.append((len(ids), rss_mb(pid)))
            xs, ys = [x for x, _ in points], [y for _, y in points]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)  # MB per session
            out[name]["series"] = {"sessions_rss_mb": points, "slope_kb_per_session": 1024 * slope,
                                   "slope_over_state": slope * 2**20 / state["bytes"]}
            now = points[-1][1]
        before = now
        every += ids
    metrics = (await client.get("/metrics")).text
    out["sessions_gauge_when_open"] = next((float(line.split()[1]) for line in metrics.splitlines()
                                            if line.startswith("nlm_sessions ")), None)
    out["rss_mb_with_all_sessions"] = before
    await asyncio.gather(*(delete(sid) for sid in every))
    await asyncio.sleep(settle)
    out["rss_mb_after_delete"] = rss_mb(pid)
    metrics = (await client.get("/metrics")).text
    out["sessions_gauge_after_delete"] = next((float(line.split()[1]) for line in metrics.splitlines()
                                               if line.startswith("nlm_sessions ")), None)
    out["errors"] = errors
    return out


def prefill_memory(path: str, prompt: str, count: int) -> dict:
    """Where a session's memory goes, in this (fresh) process: keep ``count``
    contexts from Engine.prefill (what POST /v1/sessions keeps) and read VmRSS beside glibc's own
    account (mallinfo2: bytes in use, and bytes free inside the heap), then free them, then
    malloc_trim(0) (which hands free heap pages back to the system)."""
    import ctypes
    import gc

    import torch

    from neurallm.inference import Loaded

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError) as e:
        return {"skipped": f"no glibc mallinfo2 ({e})"}

    def reading():
        m = libc.mallinfo2()
        return {"rss_mb": rss_mb("self"), "heap_in_use_mb": m.uordblks / 2**20, "heap_free_mb": m.fordblks / 2**20}

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server's decoding step
    lm = Loaded.open(ROOT / path, slots=1)
    ids = lm.encode(prompt, "prompt")
    lm.engine.prefill(ids, lm.start())
    before = reading()
    keep = [lm.engine.prefill(ids, lm.start()) for _ in range(count)]
    kept = reading()
    keep.clear()
    gc.collect()
    freed = reading()
    libc.malloc_trim(0)
    trimmed = reading()
    torch.set_num_threads(previous)
    per = {k[:-3]: 1024 * (kept[k] - before[k]) / count for k in before}  # "rss_mb" -> "rss", in KiB
    return {"contexts": count, "prompt": prompt, "before": before, "kept": kept, "after_free": freed,
            "after_malloc_trim": trimmed, "kb_per_context": per,
            "state_kb": state_bytes(path)["bytes"] / 1024}


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
        streamer = client if args.client == "httpx" else None
        for name, (path, kind) in models.items():
            model = Path(path).name
            prompt = PROMPTS[kind]
            await load(streamer, port, model, kind, prompt, 50, 1, pid)  # warm-up
            await load(streamer, port, model, kind, prompt, 50, args.streams, pid)
            single, many = [], []
            for r in range(args.repeats):  # interleaved
                single.append(await load(streamer, port, model, kind, prompt, args.tokens, 1, pid))
                many.append(await load(streamer, port, model, kind, prompt, args.tokens, args.streams, pid))
                print(f"{name} repeat {r + 1}: one stream {single[-1]['tokens_per_s']:.0f} tokens/s, gap "
                      f"{single[-1]['inter_token_ms_median']:.2f} ms; {args.streams} streams "
                      f"{many[-1]['tokens_per_s']:.0f} tokens/s, gap {many[-1]['inter_token_ms_median']:.2f} ms, "
                      f"errors {many[-1]['errors']}; load {os.getloadavg()[0]:.1f}", flush=True)
            # the repeat with the median aggregate rate (so its figures belong together)
            pick = lambda runs: sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]
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
        sessions = await sessions_memory(client, models, args.sessions, args.sessions_series, pid, args.settle)
        out["sessions"] = sessions
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--sessions-series", type=int, default=10_000,
                        help="for the first model, go on opening sessions up to this many (VmRSS after each --sessions)")
    parser.add_argument("--settle", type=float, default=6.0,
                        help="seconds the server is left idle before each memory reading (it returns freed "
                             "heap to the system every few seconds after work)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ptb", action="store_true", help="serve the character model only")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="raw: bare asyncio connections (little client CPU); httpx: httpx.AsyncClient")
    parser.add_argument("--prefill-memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prefill_memory_child:
        print(json.dumps(prefill_memory(CHAR[0], SESSION_PROMPTS["char"], 3000)))
        return
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
    child = subprocess.run([sys.executable, __file__, "--prefill-memory-child"], capture_output=True, text=True,
                           check=True)
    where = json.loads(child.stdout.strip().splitlines()[-1])
    for name, engine in alone.items():
        f = figures[name]
        f["engine_alone"] = engine
        f["server_over_engine_one_stream"] = f["one_stream"]["tokens_per_s"] / engine["batch1_tokens_per_s"]
        f["server_over_engine_concurrent"] = (f["concurrent"]["tokens_per_s"]
                                              / engine[f"batch{args.streams}_tokens_per_s"])
    write("serve", {
        "server_command": " ".join(cmd), "checkpoint": trained, "streams": args.streams, "repeats": args.repeats,
        "settle_s": args.settle,
        "client": args.client,
        "benchmark_seconds": time.perf_counter() - started, "load_average_end": os.getloadavg(),
        "meaning": {
            "one_stream": "one streamed POST /v1/completions (temperature 1, max_tokens = tokens_per_stream) alone; "
                          "tokens are counted in the streamed text (an event may carry several tokens: the server "
                          "coalesces under load; tokens_per_event); tokens_per_s: tokens after the first event "
                          "over the time from the first to the last text event (client clock); inter_token_ms_*: "
                          "gaps between consecutive text events as the client receives them; "
                          "per_token_spacing_ms_median: each gap divided among the tokens its event brings; "
                          "server_tokens_per_s_median: the server's own timings.tokens_per_s (include_usage)",
            "concurrent": "`streams` such requests sent at once from one asyncio client (`client`: raw = bare "
                          "asyncio connections parsing HTTP/1.1 chunks by hand, httpx = httpx.AsyncClient), "
                          "seeds 0..streams-1; tokens_per_s: all tokens but those of each stream's first event, "
                          "from the first text event of any stream to the last of any; tokens_per_s_wall: all "
                          "tokens from the first request sent; gaps pooled over all streams; server_cpu_s/client_cpu_s: "
                          "CPU seconds each process used during the run (they share the machine's cores)",
            "figures per model": "the repeat with the median aggregate tokens/s of `repeats`; runs: every repeat",
            "engine_alone": "Engine.step in the benchmark process before the server starts, same model and prompt, "
                            "temperature 1, torch threads as the server's decoding step uses: tokens/s at batch 1 "
                            "and at batch `streams` (median of `repeats`), and ms per step",
            "sessions": "server VmRSS (/proc/PID/status), each read after settle_s idle seconds: before (after a "
                        "warm-up of warm_up_sessions_per_model "
                        "opened and deleted per model; rss_mb_before_warm_up is the reading before it), after "
                        "opening `sessions` sessions of each model in turn (POST /v1/sessions with a short "
                        "prompt, 8 at a time; none deleted in between), and after DELETE of all; state.bytes = "
                        "layers * parts * hidden * 4, the recurrent state a session keeps; growth_over_state = "
                        "RSS growth / (sessions * state.bytes); series (first model only): VmRSS as sessions go on "
                        "opening up to --sessions-series, and the least-squares slope per session",
            "session_memory_in_process": "in a fresh child process of the benchmark: 3,000 contexts from "
                                         "Engine.prefill of the session prompt kept (char model, 1 torch thread); "
                                         "VmRSS and glibc mallinfo2 (heap bytes in use / free inside the heap) "
                                         "before, with them kept, after freeing them, after malloc_trim(0); "
                                         "kb_per_context = growth / 3,000",
        },
        "server_rss_mb_idle": rss_idle, "server_peak_rss_mb": peak, **figures,
        "session_memory_in_process": where,
    })


if __name__ == "__main__":
    main()
