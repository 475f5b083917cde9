"""The OpenAI wire format of ``nlm serve``: request bodies, error objects, response pieces."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neurallm.serve.scheduler import Job, Piece


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = \
            status, message, kind, param, code, headers


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request bodies (OpenAI's fields, plus top_k and session) ----------------------------------------

class Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)  # Python's JSON reader takes NaN
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 64)  # choice i draws with seed + i
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    session: str | None = None


class CompletionRequest(Common):
    prompt: str | list[str] = ""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Common):
    messages: list[Message]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    text: str


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str = ""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it when the client says
    its size). Checked here rather than in a middleware: Starlette's middleware wraps every streamed
    event of every response, which cost more than the rest of the server's work per token."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes; at most {limit}", code="request_too_large")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    return raw


async def parse(request: Request, schema: type[BaseModel], limit: int):
    """The JSON body as ``schema`` (whatever the Content-Type says): 400 if it is not JSON, 422 if
    a field is missing or of the wrong type."""
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}", param=where, code="invalid_value") from None


def usage(jobs: list[Job], prompt_tokens: int, cached: int) -> dict:
    completion = sum(len(j.tokens) for j in jobs)
    first = min((j.first_token for j in jobs if j.first_token), default=0.0)
    end = max((j.finished for j in jobs), default=0.0)
    rate = (completion - len(jobs)) / (end - first) if first and end > first and completion > len(jobs) else 0.0
    submitted = min(j.submitted for j in jobs)
    return {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
            "timings": {"first_token_ms": 1000 * (first - submitted) if first else None, "tokens_per_s": rate}}


def check_errors(jobs: list[Job]):
    for job in jobs:
        if job.error:
            raise ApiError(500, f"decoding failed: {job.error}", "server_error")


def finish_reason(job: Job) -> str:
    return "stop" if job.reason == "stop" else "length"


def text_event(head: str, chat: bool, index: int, text: str) -> str:
    """A chunk with text only, written without building the whole object (it is most of the traffic)."""
    body = ('"delta": {"content": %s}' if chat else '"text": %s') % json.dumps(text)
    return f'data: {head}, "choices": [{{"index": {index}, {body}, "logprobs": null, "finish_reason": null}}]}}\n\n'


def token_text(lm, token: int) -> str:
    return lm.tokenizer.token(token)


def chat_logprobs(lm, pieces: list[Piece]) -> dict:
    def entry(token, lp):
        text = token_text(lm, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(t, v) for t, v in p.top]}
                        for p in pieces]}


def completion_logprobs(lm, pieces: list[Piece], offset: int) -> dict:
    tokens, offsets, at = [], [], offset
    for p in pieces:
        tokens.append(token_text(lm, p.token))
        offsets.append(at)
        at += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [p.logprob for p in pieces],
            "top_logprobs": [{token_text(lm, t): v for t, v in p.top} for p in pieces], "text_offset": offsets}
