"""``nlm serve``: an OpenAI-compatible HTTP API and a chat page over the decoding engine.

Endpoints: GET / (the page), /health, /metrics, /v1/models; POST /v1/completions and
/v1/chat/completions (streamed as server-sent events with ``"stream": true``), /v1/score;
sessions: POST /v1/sessions, GET|DELETE /v1/sessions/{id}, POST /v1/sessions/{id}/fork,
GET /v1/sessions/{id}/state (a state file), POST /v1/sessions/resume (from one).

A session keeps a conversation's state on the server: a request naming it (``"session"``)
sends only its new text. Without one, a prompt that extends a recently finished text
(the chat page sends the whole conversation each turn) starts from that text's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from neurallm import runtime
from neurallm.engine import Context
from neurallm.errors import NlmError
from neurallm.generate import Sampling
from neurallm.inference import Loaded
from neurallm.serve.scheduler import Job, Piece, QueueFull, Scheduler
from neurallm.serve.wire import (
    ApiError,
    ChatRequest,
    Common,
    CompletionRequest,
    ScoreRequest,
    SessionRequest,
    chat_logprobs,
    check_errors,
    completion_logprobs,
    error_body,
    finish_reason,
    parse,
    read_body,
    text_event,
    usage,
)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # the most tokens one request may ask for
    max_prompt_tokens: int = 16384
    max_body_bytes: int = 4 * 2**20
    max_n: int = 8
    max_sessions: int = 100_000
    queue_size: int = 64
    retry_after_s: int = 1


@dataclass
class Session:
    lm: Loaded
    context: Context
    tokens: list[int]
    open_turn: bool = False  # the text does not end a turn: a chat message writes the turn end first
    busy: bool = False


class PrefixCache:
    """Recently finished texts' states, by their token ids: a new prompt that extends one starts there."""

    def __init__(self, size: int = 128):
        self.size, self.entries = size, {}

    def lookup(self, ids: list[int]) -> tuple[Context | None, int]:
        best, used = None, 0
        for key, context in self.entries.items():
            if used < len(key) <= len(ids) and tuple(ids[:len(key)]) == key:
                best, used = context, len(key)
        return best, used

    def store(self, ids: list[int], context: Context) -> None:
        key = tuple(ids)
        self.entries.pop(key, None)
        self.entries[key] = context
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))


def create_app(models: dict[str, Loaded], limits: Limits = Limits(), api_key: str | None = None,
               shutdown_grace_s: float = 10.0) -> FastAPI:
    scheduler: Scheduler | None = None
    sessions: dict[str, Session] = {}
    caches = {name: PrefixCache() for name in models}
    started = time.time()

    async def housekeeping():
        """Every few seconds after some work: freed heap memory goes back to the OS."""
        seen = None
        while True:
            await asyncio.sleep(5)
            now = (scheduler.stats["requests"], len(sessions))
            if now != seen:
                seen = now
                await asyncio.to_thread(runtime.release_free_memory)

    async def lifespan(app):
        nonlocal scheduler
        scheduler = Scheduler(models, queue_size=limits.queue_size)
        keeper = asyncio.create_task(housekeeping())
        yield
        keeper.cancel()
        in_flight = scheduler.active() + scheduler.queue_depth()
        await asyncio.to_thread(scheduler.close, shutdown_grace_s)
        print(f"nlm serve: stopped ({in_flight} requests in flight at shutdown; "
              f"{scheduler.stats['cancelled']} cancelled in all)", flush=True)

    app = FastAPI(title="neurallm", lifespan=lifespan, docs_url=None, redoc_url=None)

    # ---- errors: always an OpenAI-style object ----------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):  # a path or query parameter
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid')}", "invalid_request_error", where),
                            422)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still an error object, and the server goes on
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)

    @app.exception_handler(NlmError)
    async def _nlm_error(request, e: NlmError):
        return JSONResponse(error_body(str(e), "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), e.status_code)

    def authorize(request: Request):
        if api_key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    guarded = [Depends(authorize)]

    def model_of(name: str) -> Loaded:
        if name not in models:
            raise ApiError(404, f"unknown model {name!r} (serving: {', '.join(models)})", param="model",
                           code="model_not_found")
        return models[name]

    def session_of(sid: str) -> Session:
        if sid not in sessions:
            raise ApiError(404, f"unknown session {sid!r}", param="session", code="session_not_found")
        return sessions[sid]

    def encode(lm: Loaded, text: str, param: str) -> list[int]:
        try:
            ids = lm.encode(text, param)
        except NlmError as e:
            raise ApiError(400, str(e), param=param) from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, f"{param}: {len(ids)} tokens; at most {limits.max_prompt_tokens}", param=param,
                           code="prompt_too_long")
        return ids

    # ---- pages and probes -------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", dependencies=guarded)
    async def health():
        return {"status": "ok", "models": list(models), "uptime_s": time.time() - started}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        s = scheduler.stats
        ttft = s["first_token_ms_sum"] / s["first_token_count"] if s["first_token_count"] else 0.0
        lines = [
            ("nlm_requests_total", "counter", "requests accepted", s["requests"]),
            ("nlm_requests_rejected_total", "counter", "requests refused with 429", s["rejected"]),
            ("nlm_choices_completed_total", "counter", "choices finished", s["completed"]),
            ("nlm_choices_cancelled_total", "counter", "choices cancelled (client gone)", s["cancelled"]),
            ("nlm_tokens_generated_total", "counter", "tokens generated", s["tokens"]),
            ("nlm_queue_depth", "gauge", "choices waiting for a slot", scheduler.queue_depth()),
            ("nlm_active_streams", "gauge", "choices decoding now", scheduler.active()),
            ("nlm_sessions", "gauge", "open sessions", len(sessions)),
            ("nlm_tokens_per_second", "gauge", "tokens generated per second, last 10 s", scheduler.tokens_per_s()),
            ("nlm_time_to_first_token_ms", "gauge", "mean time to first token", ttft),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(started), "owned_by": "neurallm",
             "tokenizer": lm.tokenizer.kind, "vocab_size": lm.tokenizer.vocab_size, "cell": lm.recipe.model.cell,
             "chat_format": {"user": lm.chat.user, "assistant": lm.chat.assistant, "turn_end": lm.chat.turn_end}}
            for name, lm in models.items()]}

    # ---- generation ----------------------------------------------------------------------------------

    def sampling_of(body: Common, default_max_tokens: int) -> tuple[Sampling, int]:
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = min(default_max_tokens, limits.max_tokens) if limit is None else limit
        if not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400 if max_tokens > limits.max_tokens else 422,
                           f"max_tokens: {max_tokens} (expected 1 to {limits.max_tokens})", param="max_tokens")
        if body.n > limits.max_n:
            raise ApiError(400, f"n: {body.n} (at most {limits.max_n})", param="n")
        try:
            return Sampling(body.temperature, body.top_k, body.top_p), max_tokens
        except NlmError as e:
            raise ApiError(422, str(e), code="invalid_value") from None

    def stops_of(body: Common, extra: list[str]) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        return stops + extra

    async def run_jobs(request: Request, lm: Loaded, start: Context, prompt: list[int], max_tokens: int,
                       sampling: Sampling, body: Common, stops: list[str], logprobs: int, after: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [Job(lm, start, prompt, max_tokens, sampling, None if body.seed is None else body.seed + i, stops,
                    logprobs, after, i, loop, queue) for i in range(body.n)]
        try:
            scheduler.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        return jobs

    async def events(request: Request, jobs: list[Job]):
        """Lists of (choice index, Piece) as they come, (index, None) when a choice ends. A client that
        goes away cancels its jobs (polled every 0.25 s; their slots free at the next step)."""

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            for job in jobs:
                scheduler.cancel(job)

        watcher = asyncio.create_task(watch())
        left = len(jobs)
        queue = jobs[0].events  # one queue for all of a request's choices
        try:
            while left:
                batch = [await queue.get()]
                while not queue.empty():  # what else has come meanwhile: sent together when streaming
                    batch.append(queue.get_nowait())
                left -= sum(item is None for _, item in batch)
                yield batch
        finally:
            watcher.cancel()
            for job in jobs:
                if not job.reason:
                    scheduler.cancel(job)

    def prepare(body: Common, lm: Loaded, text: str, param: str, chat: bool):
        """-> (start context, ids to read, all ids of the text, tokens reused, session)."""
        session = None
        if body.session is not None:
            session = session_of(body.session)
            if session.lm is not lm:
                raise ApiError(400, f"session {body.session} belongs to model {session.lm.name}", param="session")
            if session.busy:
                raise ApiError(409, f"session {body.session} is answering another request", param="session",
                               code="session_busy")
            if chat and session.open_turn:
                text = lm.chat.turn_end + text
            ids = encode(lm, text, param)
            return session.context, ids, session.tokens + ids, session.context.length - 1, session
        ids = encode(lm, text, param)
        full = [lm.tokenizer.boundary] + ids
        cached, used = caches[lm.name].lookup(full)
        if cached is None:
            return lm.start(), ids, full, 0, None
        return cached, full[used:], full, used - 1, None  # the boundary token is no prompt token

    def remember(lm: Loaded, job: Job, full: list[int], session: Session | None, chat: bool):
        if job.final is None:
            return
        tokens = full + job.tokens
        caches[lm.name].store(tokens, job.final)
        if session is not None:
            session.context, session.tokens = job.final, tokens
            # A text that does not end a turn (a cut-off reply, a user stop string, a plain completion)
            # gets the turn end written before the next chat message.
            session.open_turn = not lm.tokenizer.decode(tokens[-8:]).endswith(lm.chat.turn_end)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = await parse(request, CompletionRequest, limits.max_body_bytes)
        lm = model_of(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        if not isinstance(body.prompt, str) and len(body.prompt) > 1:
            raise ApiError(400, "prompt: one prompt per request (or a list of one)", param="prompt")
        sampling, max_tokens = sampling_of(body, 16)  # OpenAI's default for completions
        start, ids, full, cached, session = prepare(body, lm, prompt, "prompt", chat=False)
        logprobs = -1 if body.logprobs is None else body.logprobs
        return await respond(request, body, lm, start, ids, full, cached, session, max_tokens, sampling,
                             stops_of(body, []), logprobs, prompt, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest, limits.max_body_bytes)
        lm = model_of(body.model)
        if not body.messages:
            raise ApiError(422, "messages: at least one message", param="messages")
        sampling, max_tokens = sampling_of(body, 512)  # a reply ends at the turn end well before, as a rule
        for i, message in enumerate(body.messages):  # an unknown character is named in its own message
            encode(lm, message.content, f"messages[{i}].content")
        text = lm.chat_text([m.model_dump() for m in body.messages])
        start, ids, full, cached, session = prepare(body, lm, text, "messages", chat=True)
        logprobs = (body.top_logprobs or 0) if body.logprobs else -1
        return await respond(request, body, lm, start, ids, full, cached, session, max_tokens, sampling,
                             stops_of(body, [lm.chat.turn_end]), logprobs, lm.chat.assistant, chat=True)

    async def respond(request, body, lm, start, ids, full, cached, session, max_tokens, sampling, stops, logprobs,
                      shown, chat):
        if session is not None:
            session.busy = True
        try:
            jobs = await run_jobs(request, lm, start, ids, max_tokens, sampling, body, stops, logprobs, shown)
        except BaseException:
            if session is not None:
                session.busy = False
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        prompt_tokens = len(full) - 1  # the text read, the part read before (cached) included
        echo = getattr(body, "echo", False)

        def wrap_up():
            if session is not None:
                session.busy = False
            for job in jobs:
                remember(lm, job, full, session if job is jobs[0] else None, chat)

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(request, jobs, rid, created, lm, chat, echo, shown, include_usage,
                                         prompt_tokens, cached, wrap_up), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, lps = [[] for _ in jobs], [[] for _ in jobs]
        try:
            async for batch in events(request, jobs):
                for i, item in batch:
                    if isinstance(item, Piece):
                        texts[i].append(item.text)
                        if item.token >= 0 and jobs[i].logprobs >= 0:
                            lps[i].append(item)
        finally:
            wrap_up()
        check_errors(jobs)
        choices = []
        for i, job in enumerate(jobs):
            text = "".join(texts[i])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(lm, lps[i]) if job.logprobs >= 0 else None,
                                "finish_reason": finish_reason(job)})
            else:
                choices.append({"index": i, "text": (shown if echo else "") + text,
                                "logprobs": completion_logprobs(lm, lps[i], len(shown) if echo else 0)
                                if job.logprobs >= 0 else None, "finish_reason": finish_reason(job)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": lm.name, "choices": choices, **usage(jobs, prompt_tokens, cached)}

    async def sse(request, jobs, rid, created, lm, chat, echo, shown, include_usage, prompt_tokens, cached, wrap_up):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": lm.name,
                                          "choices": choices, **extra}) + "\n\n"

        try:
            for i in range(len(jobs)):
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                elif echo:
                    yield chunk([{"index": i, "text": shown, "logprobs": None, "finish_reason": None}])
            # Text is sent as it comes; under load, the tokens of a stream that arrived since the
            # last write go out in one event (one write per stream per turn of the event loop).
            head = json.dumps({"id": rid, "object": kind, "created": created, "model": lm.name})[:-1]
            async for batch in events(request, jobs):
                pending: dict[int, list[str]] = {}
                for i, item in batch:
                    job = jobs[i]
                    if isinstance(item, Piece) and job.logprobs < 0:
                        pending.setdefault(i, []).append(item.text)
                        continue
                    if i in pending:
                        yield text_event(head, chat, i, "".join(pending.pop(i)))
                    if item is None:
                        if job.error:
                            yield "data: " + json.dumps(error_body(f"decoding failed: {job.error}",
                                                                   "server_error")) + "\n\n"
                            continue
                        end = {"index": i, "logprobs": None, "finish_reason": finish_reason(job)}
                        yield chunk([{**end, "delta": {}} if chat else {**end, "text": ""}])
                        continue
                    if item.token < 0:  # the held-back tail of a text that ended without its stop string
                        if item.text:
                            yield text_event(head, chat, i, item.text)
                        continue
                    lp = chat_logprobs(lm, [item]) if chat else completion_logprobs(lm, [item], 0)
                    if chat:
                        yield chunk([{"index": i, "delta": {"content": item.text}, "logprobs": lp,
                                      "finish_reason": None}])
                    else:
                        yield chunk([{"index": i, "text": item.text, "logprobs": lp, "finish_reason": None}])
                for i, pieces in pending.items():
                    text = "".join(pieces)
                    if text:
                        yield text_event(head, chat, i, text)
            if include_usage:
                yield chunk([], **usage(jobs, prompt_tokens, cached))
            yield "data: [DONE]\n\n"
        finally:
            wrap_up()

    @app.post("/v1/score", dependencies=guarded)
    async def score(request: Request):
        from neurallm.evaluate import score as score_text

        body = await parse(request, ScoreRequest, limits.max_body_bytes)

        lm = model_of(body.model)
        encode(lm, body.text, "text")  # the same checks as a prompt (vocabulary, length)
        try:
            result = await asyncio.to_thread(score_text, lm.model, lm.tokenizer, body.text, 70, "text")
        except NlmError as e:
            raise ApiError(400, str(e), param="text") from None
        return {"object": "score", "model": lm.name, **result}

    # ---- sessions ------------------------------------------------------------------------------------

    def new_session(lm: Loaded, context: Context, tokens: list[int]) -> dict:
        if len(sessions) >= limits.max_sessions:
            raise ApiError(429, f"{len(sessions)} sessions are open (at most {limits.max_sessions}); delete some",
                           "rate_limit_error", code="too_many_sessions",
                           headers={"Retry-After": str(limits.retry_after_s)})
        sid = "sess-" + secrets.token_hex(12)
        open_turn = len(tokens) > 1 and not lm.tokenizer.decode(tokens[-8:]).endswith(lm.chat.turn_end)
        sessions[sid] = Session(lm, context, tokens, open_turn)
        return describe(sid)

    def describe(sid: str) -> dict:
        s = sessions[sid]
        return {"id": sid, "object": "session", "model": s.lm.name, "tokens": s.context.length}

    @app.post("/v1/sessions", dependencies=guarded)
    async def create_session(request: Request):
        body = await parse(request, SessionRequest, limits.max_body_bytes)
        lm = model_of(body.model)
        ids = encode(lm, body.prompt, "prompt")
        context = await asyncio.to_thread(lm.engine.prefill, ids, lm.start()) if ids else lm.start()
        return new_session(lm, context, [lm.tokenizer.boundary] + ids)

    @app.get("/v1/sessions/{sid}", dependencies=guarded)
    async def get_session(sid: str):
        session_of(sid)
        return describe(sid)

    @app.delete("/v1/sessions/{sid}", dependencies=guarded)
    async def delete_session(sid: str):
        session_of(sid)
        del sessions[sid]
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{sid}/fork", dependencies=guarded)
    async def fork_session(sid: str):
        s = session_of(sid)
        return new_session(s.lm, s.context, list(s.tokens))

    @app.get("/v1/sessions/{sid}/state", dependencies=guarded)
    async def save_session(sid: str):
        s = session_of(sid)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nlm-{secrets.token_hex(8)}.safetensors"
        try:
            s.lm.save_state(path, s.context, s.tokens)
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.safetensors"'})

    @app.post("/v1/sessions/resume", dependencies=guarded)
    async def resume_session(request: Request, model: str):
        lm = model_of(model)
        data = await read_body(request, limits.max_body_bytes)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nlm-{secrets.token_hex(8)}.safetensors"
        try:
            path.write_bytes(data)
            context, tokens = lm.load_state(path)
        except NlmError as e:
            raise ApiError(400, str(e).replace(str(path), "the uploaded state"), code="bad_state") from None
        finally:
            path.unlink(missing_ok=True)
        return new_session(lm, context, tokens)

    app.state.sessions = sessions
    app.state.scheduler = lambda: scheduler
    return app


def decode_threads() -> int:
    """Half the cores for the decoding step's own threads, the rest for HTTP (and clients on the same
    machine). A decoding step is many small operations: with every core busy, OpenMP threads that
    wait for each other made a step of 32 streams take 95 ms here, against 4.6 ms on one thread."""
    return max(1, (os.cpu_count() or 2) // 2)


def serve(checkpoints: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", slots: int = 32, limits: Limits = Limits(), shutdown_grace_s: float = 10.0,
          threads: int | None = None) -> int:
    import torch
    import uvicorn

    torch.set_num_threads(threads or decode_threads())
    models: dict[str, Loaded] = {}
    for path in checkpoints:
        lm = Loaded.open(path, device=device, slots=slots)
        if lm.name in models:
            raise NlmError(f"{path}: another checkpoint is already served as {lm.name!r} (names are folder names)")
        models[lm.name] = lm
    app = create_app(models, limits, api_key, shutdown_grace_s)
    print(f"serving {', '.join(models)} on http://{host}:{port}/ (chat page at /, OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_grace_s)
    return 0
