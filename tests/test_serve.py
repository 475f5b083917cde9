"""nlm serve: the OpenAI API (with the official client), sessions, bad input, load limits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY, head, need

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny character model (Shakespeare slice, 8 steps) with the shipped chat format."""
    from neurallm.cli import main

    root = tmp_path_factory.mktemp("serve")
    lines = head(need("tinyshakespeare", "input.txt"), 460).splitlines(keepends=True)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("".join(lines[:400]), encoding="utf-8")
    for split in ("valid", "test"):
        (corpus / f"{split}.txt").write_text("".join(lines[400:]), encoding="utf-8")
    out = root / "tiny-char"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "8", "--no-progress",
                 f"--data.corpus={corpus}", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def client(model_dir):
    from fastapi.testclient import TestClient

    from neurallm.inference import Loaded
    from neurallm.serve.app import Limits, create_app

    lm = Loaded.open(model_dir, slots=4)
    app = create_app({lm.name: lm}, Limits(max_tokens=500, max_prompt_tokens=200, max_body_bytes=20000))
    with TestClient(app) as c:
        c.model = lm.name
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "neurallm", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                headers = {"Authorization": f"Bearer {os.environ.get('NLM_TEST_KEY', '')}"}
                urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers), timeout=1)
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without a key)
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stdout.read())
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> str:
        """SIGTERM; -> what the server printed. (uvicorn re-raises the signal once it has shut down.)"""
        self.proc.terminate()
        assert self.proc.wait(timeout=30) in (0, -15)
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(str(model_dir), "--slots", "1", "--queue-size", "1")
    yield s
    out = s.stop()
    assert "nlm serve: stopped" in out and "Traceback" not in out  # SIGTERM: a clean shutdown


def greedy(client, messages, n=40):
    r = client.post("/v1/chat/completions", json={"model": client.model, "messages": messages, "temperature": 0,
                                                   "max_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_greedy_is_the_same_through_generate_chat_and_the_server(client, model_dir, capsys):
    from neurallm.chat import Conversation
    from neurallm.cli import main
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(model_dir, slots=1)
    conversation = Conversation(lm, Sampling(temperature=0), max_tokens=40)
    in_chat = "".join(conversation.reply("Good morrow"))
    assert greedy(client, [{"role": "user", "content": "Good morrow"}]) == in_chat
    # Streamed: the same text, piece by piece.
    body = {"model": client.model, "messages": [{"role": "user", "content": "Good morrow"}], "temperature": 0,
            "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == in_chat
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["timings"]["first_token_ms"] > 0
    # nlm generate reads the same text the chat format makes, and continues it the same way.
    prompt = lm.chat_text([{"role": "user", "content": "Good morrow"}])
    assert main(["generate", str(model_dir), "--prompt", prompt, "--max-tokens", "40", "--temperature", "0",
                 "--json"]) == 0
    generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"][len(prompt):]
    assert generated.startswith(in_chat)


def test_n_choices_with_a_seed_equal_separate_requests(client):
    base = {"model": client.model, "prompt": "ROMEO:\n", "max_tokens": 30, "temperature": 1.0, "top_k": 20}
    together = client.post("/v1/completions", json={**base, "n": 3, "seed": 5}).json()["choices"]
    alone = [client.post("/v1/completions", json={**base, "seed": 5 + i}).json()["choices"][0]["text"]
             for i in range(3)]
    assert [c["text"] for c in together] == alone
    assert len(set(alone)) > 1  # different seeds, different texts


def test_completions_logprobs_echo_and_score_agree(client):
    r = client.post("/v1/completions", json={"model": client.model, "prompt": "ROMEO:", "max_tokens": 5,
                                             "temperature": 0, "logprobs": 2, "echo": True}).json()
    choice = r["choices"][0]
    assert choice["text"].startswith("ROMEO:")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 5 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert all(lp["token_logprobs"][i] == pytest.approx(max(lp["top_logprobs"][i].values()), abs=1e-6)
               for i in range(5))  # greedy takes the best
    # /v1/score gives the numbers nlm score gives; the generated text's own tokens score as the stream said.
    text = choice["text"]
    scored = client.post("/v1/score", json={"model": client.model, "text": text}).json()
    assert [t["token"] for t in scored["tokens"]][-5:] == lp["tokens"]
    assert [t["logprob"] for t in scored["tokens"]][-5:] == pytest.approx(lp["token_logprobs"], abs=1e-4)
    assert r["usage"]["completion_tokens"] == 5


def test_a_session_continues_without_resending_and_forks_identically(client):
    model = client.model
    sid = client.post("/v1/sessions", json={"model": model, "prompt": "ROMEO:\nGood morrow"}).json()["id"]
    first = client.post("/v1/completions", json={"model": model, "session": sid, "prompt": ", fair", "max_tokens": 10,
                                                 "temperature": 0}).json()["choices"][0]["text"]
    fork = client.post(f"/v1/sessions/{sid}/fork").json()["id"]
    a = client.post("/v1/completions", json={"model": model, "session": sid, "prompt": " lady", "max_tokens": 15,
                                             "temperature": 0.9, "seed": 3}).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json={"model": model, "session": fork, "prompt": " lady", "max_tokens": 15,
                                             "temperature": 0.9, "seed": 3}).json()["choices"][0]["text"]
    assert a == b
    # The same as sending the whole text at once.
    whole = client.post("/v1/completions", json={"model": model, "prompt": "ROMEO:\nGood morrow, fair", "max_tokens": 10,
                                                 "temperature": 0}).json()["choices"][0]["text"]
    assert whole == first
    # Saved as a file, resumed as a new session: it continues the same way.
    state = client.get(f"/v1/sessions/{fork}/state")
    assert state.status_code == 200 and json.loads(state.content[8:8 + int.from_bytes(state.content[:8], "little")])[
        "__metadata__"]["format"] == "neurallm-state/1"  # a safetensors file
    resumed = client.post(f"/v1/sessions/resume?model={model}", content=state.content).json()["id"]
    c = client.post("/v1/completions", json={"model": model, "session": resumed, "prompt": "!", "max_tokens": 10,
                                             "temperature": 0}).json()["choices"][0]["text"]
    d = client.post("/v1/completions", json={"model": model, "session": fork, "prompt": "!", "max_tokens": 10,
                                             "temperature": 0}).json()["choices"][0]["text"]
    assert c == d
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    assert client.get(f"/v1/sessions/{sid}").status_code == 404
    altered = bytearray(state.content)
    altered[-3] ^= 0xFF
    bad = client.post(f"/v1/sessions/resume?model={model}", content=bytes(altered))
    assert bad.status_code == 400 and "altered" in bad.json()["error"]["message"]


def test_a_user_stop_string_ends_the_text_and_a_session_writes_the_turn_end_next(client):
    model = client.model
    free = client.post("/v1/completions", json={"model": model, "prompt": "ROMEO:\n", "max_tokens": 60,
                                                "temperature": 0}).json()["choices"][0]["text"]
    stop = free[3:5]  # two characters the greedy text holds
    cut = client.post("/v1/completions", json={"model": model, "prompt": "ROMEO:\n", "max_tokens": 60,
                                               "temperature": 0, "stop": stop}).json()["choices"][0]
    assert cut["text"] == free[:free.index(stop)] and cut["finish_reason"] == "stop"
    sid = client.post("/v1/sessions", json={"model": model, "prompt": "ROMEO:\nGood"}).json()["id"]
    reply = client.post("/v1/chat/completions", json={"model": model, "session": sid, "max_tokens": 20,
                                                      "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    # The session's text did not end its turn, so the message came after a turn end: as if sent whole.
    whole = greedy(client, [{"role": "system", "content": "ROMEO:\nGood"}, {"role": "user", "content": "Hi"}], 20)
    assert reply.json()["choices"][0]["message"]["content"] == whole


def test_the_chat_page_is_served_and_the_api_lists_models(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == client.model and models["data"][0]["chat_format"]["user"] == "ROMEO:\n"
    metrics = client.get("/metrics").text
    assert "nlm_requests_total" in metrics and "nlm_time_to_first_token_ms" in metrics


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": -5}).encode(), 422),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": 10**6}).encode(), 400),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": "many"}).encode(), 422),
    (json.dumps({"model": "MODEL", "prompt": "hi", "temperature": "hot"}).encode(), 422),
    (b'{"model": "MODEL", "prompt": "hi", "temperature": NaN}', 422),
    (json.dumps({"model": "MODEL", "prompt": "hi", "n": 100}).encode(), 400),
    (json.dumps({"model": "MODEL"}).encode()[:-1] + b', "prompt": 5}', 422),
    (json.dumps({"model": "MODEL", "prompt": "a" * 500}).encode(), 413),  # over max_prompt_tokens
    (json.dumps({"model": "MODEL", "prompt": "a" * 30000}).encode(), 413),  # over max_body_bytes
    (json.dumps({"model": "MODEL", "prompt": "✓ not in the vocabulary"}).encode(), 400),
    (json.dumps({"model": "MODEL", "prompt": "hi", "session": "sess-none"}).encode(), 404),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status):
    r = client.post("/v1/completions", content=body.replace(b"MODEL", client.model.encode()))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert greedy(client, [{"role": "user", "content": "Hi"}], 3)  # still serving


def test_an_api_key_guards_every_endpoint_but_the_page(model_dir):
    from fastapi.testclient import TestClient

    from neurallm.inference import Loaded
    from neurallm.serve.app import create_app

    lm = Loaded.open(model_dir, slots=1)
    with TestClient(create_app({lm.name: lm}, api_key="s3cret")) as c:
        assert c.get("/").status_code == 200
        for path in ("/health", "/metrics", "/v1/models"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/completions", json={"model": lm.name, "prompt": "a"}).status_code == 401


def test_the_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list()]
    done = client.completions.create(model=model, prompt="ROMEO:\n", max_tokens=20, temperature=0)
    assert done.usage.completion_tokens == 20 and done.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=model, prompt="ROMEO:\n", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Good morrow"}],
                                          max_tokens=30, temperature=0.7, seed=1, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].logprobs.content and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    pieces = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Good morrow"}],
                                            max_tokens=30, temperature=0.7, seed=1, stream=True,
                                            extra_body={"top_k": 0})
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(server):
    """One slot, a queue of one: a long stream holds the slot, a second request waits, a third is refused.
    When the first client goes, its slot goes to the waiting request at once."""
    import httpx

    (model,) = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    long = {"model": model, "prompt": "ROMEO:\n", "max_tokens": 4000, "stream": True}
    first = httpx.Client(timeout=30)
    stream = first.stream("POST", server.url + "/v1/completions", json=long)
    response = stream.__enter__()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))  # it is decoding
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=httpx.post(
        server.url + "/v1/completions", json={"model": model, "prompt": "A", "max_tokens": 5}, timeout=60)))
    t.start()
    deadline = time.time() + 10
    while "nlm_queue_depth 1" not in httpx.get(server.url + "/metrics").text and time.time() < deadline:
        time.sleep(0.05)
    refused = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "B", "max_tokens": 5})
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    stream.__exit__(None, None, None)  # the first client disconnects
    first.close()
    t.join(timeout=30)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 5
    metrics = httpx.get(server.url + "/metrics").text
    assert "nlm_choices_cancelled_total 1" in metrics and "nlm_active_streams 0" in metrics
