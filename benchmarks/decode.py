"""Decoding speed and memory, side by side with a plain-PyTorch reference decode loop, same run.

    python benchmarks/decode.py
    python benchmarks/decode.py --tokens 300 --repeats 3 --turns 1000 --long 100000

The reference is what pytorch/examples word_language_model's generate.py does, written here
without neurallm: nn.Embedding -> nn.LSTM(num_layers=2, batch_first=True) -> nn.Linear, eager
fp32, one token per call, log-softmax / temperature, exp, torch.multinomial. It is loaded
with the same checkpoint's weights (checked: its log-probabilities equal the model's within
1e-4). For an adaptive-softmax checkpoint the reference ends in torch's own
nn.AdaptiveLogSoftmaxWithLoss.log_prob, the same module and weights the model has.

Models: a full-softmax 2 x 200 LSTM on WikiText-2's 33,278 words (runs/decode-wt2-full, trained
here when missing), the adaptive-softmax wikitext2-small (runs/speed-wikitext2-small) and the
tied full-softmax ptb-small (runs/speed-ptb-small) when present, and a character model
(runs/decode-char, trained here when missing) for the chat and long-stream figures.

Measured: (a) batch-1 sampling at temperature 1, ours (Engine, one slot) against the reference;
(b) batch 32 through the engine, greedy against temperature 0.8 + top-k 40 + top-p 0.95, with
the reference's batch-32 loop for context; (c) time to first token and peak RSS, each in a
fresh process (nlm generate --bench --json, and the reference in a child process); (d) the
cost per new token of a chat turn after 10 and after 1,000 turns; (e) RSS while one stream
generates 100,000 tokens. Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

FULL = ("runs/decode-wt2-full",
        ["nlm", "train", "wikitext2-small", "--model.softmax=full", "--max-steps", "600", "--out",
         "runs/decode-wt2-full", "--no-progress"])
CHAR = ("runs/decode-char",
        ["nlm", "train", "shakespeare-char-small", "--max-steps", "300", "--out", "runs/decode-char", "--no-progress"])
OPTIONAL = {"wt2-adaptive": "runs/speed-wikitext2-small", "ptb-full-tied": "runs/speed-ptb-small"}

# A prompt for the time-to-first-token figures (words the word models know; <unk> otherwise).
WORD_PROMPT = ("the game 's opening theme was composed by the same team , and the soundtrack was released "
               "in japan in the following year .")
CHAR_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
CHAT_MESSAGES = ["Good morrow.", "What news?", "I love thee.", "Farewell, sweet.", "Stay a while."]


def rss_mb(pid: str | int = "self") -> float:
    """Resident memory now (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over fork + exec,
    so a child started from this (large) process would report at least the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fresh(cmd: list[str]) -> str:
    """Run ``cmd`` as a grandchild through sh, so its ru_maxrss starts from sh's small size rather than
    from this process's (nlm generate --bench reports ru_maxrss); -> its stdout's last line."""
    proc = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


# ---- the reference: plain PyTorch, as pytorch/examples word_language_model writes it ----------------

class Reference(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, adaptive: dict | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, batch_first=True)
        self.adaptive = adaptive is not None
        self.out = (nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, adaptive["cutoffs"], div_value=adaptive["div_value"])
                    if adaptive else nn.Linear(hidden, vocab))

    def forward(self, x, hidden=None):
        """x (batch, time) -> log-probabilities (batch, time, vocab), hidden."""
        y, hidden = self.rnn(self.embed(x), hidden)
        flat = y.reshape(-1, y.size(-1))
        logp = self.out.log_prob(flat) if self.adaptive else F.log_softmax(self.out(flat), dim=-1)
        return logp.view(*y.shape[:2], -1), hidden


def reference_from(cfg: dict, state: dict) -> Reference:
    """A Reference holding a neurallm checkpoint's weights (config.json's "model", its state_dict)."""
    m = cfg["model"]
    if m["cell"] != "lstm" or m["connection"] != "none" or (m["tie_weights"] and m["emb_size"] != m["hidden_size"]):
        raise SystemExit(f"the reference covers plain LSTM stacks only, not {m}")
    adaptive = None
    if m["softmax"] == "adaptive":
        adaptive = {"cutoffs": [c for c in m["adaptive_cutoffs"] if c < m["vocab_size"]],
                    "div_value": m["adaptive_div_value"]}
    ref = Reference(m["vocab_size"], m["emb_size"], m["hidden_size"], m["num_layers"], adaptive)
    mapped = {"embed.weight": state["embedding.weight"]}
    for i in range(m["num_layers"]):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            mapped[f"rnn.{name}_l{i}"] = state[f"stack.layers.{i}.rnn.{name}_l0"]
    for key, value in state.items():
        if key.startswith("decoder."):
            mapped["out." + key[len("decoder."):]] = value
    if m["tie_weights"] and "out.weight" not in mapped:  # the checkpoint file stores a tied weight once
        mapped["out.weight"] = state["embedding.weight"]
    ref.load_state_dict(mapped, strict=True)
    return ref.eval()


@torch.no_grad()
def reference_decode(ref: Reference, token: int, tokens: int, batch: int = 1, temperature: float = 1.0,
                     hidden=None) -> tuple[list, float]:
    """generate.py's loop from ``token``: feed one token, log-probabilities / temperature, exp,
    multinomial, repeat. -> (ids per step, seconds)."""
    inp = torch.full((batch, 1), token, dtype=torch.long)
    out = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        output, hidden = ref(inp, hidden)
        word_weights = output[:, -1].div(temperature).exp()  # (batch, vocab)
        inp = torch.multinomial(word_weights, 1)  # (batch, 1)
        out.append(inp.view(-1).tolist())  # the ids on the host, as a caller needs them
    return out, time.perf_counter() - t0


# ---- child processes: a fresh process per peak-RSS and long-stream figure ---------------------------------

def child_reference(args) -> None:
    """The reference in a process of its own, without neurallm: load, read the prompt, decode."""
    from safetensors.torch import load_file

    t_load = time.perf_counter()
    cfg = json.loads((Path(args.checkpoint) / "config.json").read_text())
    ref = reference_from(cfg, load_file(str(Path(args.checkpoint) / "model.safetensors")))
    load_s = time.perf_counter() - t_load
    ids = json.loads(args.ids)
    torch.manual_seed(0)
    with torch.no_grad():
        started = time.perf_counter()
        _, hidden = ref(torch.tensor([ids[:-1]]))  # the prompt but its last token, in one call
        reference_decode(ref, ids[-1], 1, hidden=hidden)
        first = time.perf_counter()
    print(json.dumps({"first_token_ms": 1000 * (first - started), "load_s": load_s, "prompt_tokens": len(ids),
                      "peak_rss_mb": peak_rss_mb()}))


def child_memory(args) -> None:
    """One stream generating ``args.tokens`` tokens through the engine: VmRSS along the way."""
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(args.checkpoint, slots=1)
    engine = lm.engine
    stream = engine.submit(lm.start(), args.tokens, Sampling(1.0), seed=0)
    engine.step()  # the first step allocates what every later step reuses
    samples = [(1, rss_mb())]
    t0 = time.perf_counter()
    while engine.streams:
        engine.step()
        if stream.generated % 10_000 == 0 or stream.done:
            samples.append((stream.generated, rss_mb()))
    seconds = time.perf_counter() - t0
    print(json.dumps({"tokens": stream.generated, "seconds": seconds,
                      "tokens_per_s": (stream.generated - 1) / seconds, "rss_mb_at_start": samples[0][1],
                      "rss_mb_at_end": samples[-1][1], "rss_mb_by_tokens": samples, "peak_rss_mb": peak_rss_mb(),
                      "tokens_behind_state": stream.context.length}))


# ---- the parent ---------------------------------------------------------------------------------------

def ensure_checkpoint(path: str, command: list[str]) -> dict:
    """Train ``path`` with ``command`` unless its weights are there; wait for a run already training it."""
    weights = ROOT / path / "model.safetensors"
    waited = 0.0
    t0 = time.perf_counter()
    while True:
        running = [p for p in subprocess.run(["pgrep", "-f", f"out {path}"], capture_output=True, text=True, check=False)
                   .stdout.split() if int(p) != os.getpid()]
        if not running:
            break
        print(f"waiting for the run training {path} (pids {' '.join(running)})", flush=True)
        time.sleep(15)
        waited = time.perf_counter() - t0
    if weights.is_file():
        return {"checkpoint": path, "trained_here": False, "waited_s": waited, "train_command": " ".join(command)}
    print("$", " ".join(command), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return {"checkpoint": path, "trained_here": True, "train_s": time.perf_counter() - t0,
            "train_command": " ".join(command)}


def median(values):
    return statistics.median(values)


@torch.no_grad()
def engine_run(engine, context, tokens: int, batch: int, sampling, seed: int = 0) -> tuple[int, float]:
    """Submit ``batch`` streams of ``tokens`` from one context (seeds seed, seed + 1, ...), step until
    all are done. -> (tokens produced, seconds)."""
    t0 = time.perf_counter()
    for i in range(batch):
        engine.submit(context, tokens, sampling, seed=seed + i)
    produced = 0
    while engine.streams:
        produced += len(engine.step())
    return produced, time.perf_counter() - t0


def check_reference(lm, ref: Reference, ids: list[int]) -> float:
    """Max |difference| of the log-probabilities, ours (model(ids), model.log_probs) against the reference's."""
    with torch.no_grad():
        features, _ = lm.model.model(torch.tensor([ids]))
        ours = lm.model.model.log_probs(features)
        theirs, _ = ref(torch.tensor([ids]))
    diff = float((ours - theirs).abs().max())
    if not diff <= 1e-4:
        raise SystemExit(f"{lm.name}: the reference's log-probabilities differ from ours by {diff}")
    return diff


def measure_model(name: str, path: str, args) -> dict:
    from neurallm.engine import Engine
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(ROOT / path, slots=1)
    cfg = json.loads((ROOT / path / "config.json").read_text())
    ref = reference_from(cfg, lm.model.model.state_dict())
    probe = lm.encode(WORD_PROMPT, "probe")[:24]
    diff = check_reference(lm, ref, [lm.tokenizer.boundary] + probe)
    one, many = lm.engine, Engine(lm.model, slots=32)
    boundary = lm.tokenizer.boundary
    start = lm.start()
    t1 = Sampling(1.0)
    hot = Sampling(0.8, 40, 0.95)
    greedy = Sampling(0.0)
    n = args.tokens
    # warm-up: every path once
    engine_run(one, start, 50, 1, t1)
    engine_run(many, start, 20, 32, hot)
    engine_run(many, start, 20, 32, greedy)
    torch.manual_seed(0)
    reference_decode(ref, boundary, 50)
    reference_decode(ref, boundary, 20, batch=32)

    loads = []
    runs = {k: [] for k in ("ours_b1", "ref_b1", "greedy_b32", "hot_b32", "t1_b32", "ref_b32")}
    for r in range(args.repeats):  # interleaved, so a burst of load on the machine hits all alike
        produced, s = engine_run(one, start, n, 1, t1, seed=r)
        runs["ours_b1"].append(produced / s)
        torch.manual_seed(r)
        ids, s = reference_decode(ref, boundary, n)
        runs["ref_b1"].append(len(ids) / s)
        for key, sampling in (("greedy_b32", greedy), ("hot_b32", hot), ("t1_b32", t1)):
            produced, s = engine_run(many, start, args.tokens_batch32, 32, sampling, seed=100 * r)
            runs[key].append(produced / s)
        ids, s = reference_decode(ref, boundary, args.tokens_batch32, batch=32)
        runs["ref_b32"].append(32 * len(ids) / s)
        loads.append(os.getloadavg()[0])
        print(f"{name} repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items())
              + f"; load {loads[-1]:.1f}", flush=True)
    med = {k: median(v) for k, v in runs.items()}
    # Time to first token in this (warm) process: read a 25-token prompt, sample one token.
    prompt = lm.encode(WORD_PROMPT, "prompt")
    ours_ttft, ref_ttft = [], []
    for r in range(5):
        t0 = time.perf_counter()
        engine_run(one, one.prefill(prompt, start), 1, 1, t1, seed=r)
        ours_ttft.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.no_grad():
            _, hidden = ref(torch.tensor([[boundary] + prompt[:-1]]))
        reference_decode(ref, prompt[-1], 1, hidden=hidden)
        ref_ttft.append(1000 * (time.perf_counter() - t0))
    return {
        "checkpoint": path, "model": {k: cfg["model"][k] for k in ("vocab_size", "emb_size", "hidden_size",
                                                                   "num_layers", "softmax", "tie_weights")},
        "reference_max_abs_logprob_diff": diff, "load_average_1min_per_repeat": loads,
        "first_token_warm": {"prompt_tokens": len(prompt) + 1, "ours_ms": median(ours_ttft),
                             "reference_ms": median(ref_ttft)},
        "batch1": {"ours_tokens_per_s": med["ours_b1"], "reference_tokens_per_s": med["ref_b1"],
                   "ratio_ours_over_reference": med["ours_b1"] / med["ref_b1"], "target_ratio": ">= 5",
                   "runs": {"ours": runs["ours_b1"], "reference": runs["ref_b1"]}},
        "batch32": {"greedy_tokens_per_s": med["greedy_b32"], "sampling_tokens_per_s": med["hot_b32"],
                    "sampling_over_greedy_time": med["greedy_b32"] / med["hot_b32"], "target_time_ratio": "<= 1.3",
                    "temperature1_tokens_per_s": med["t1_b32"], "reference_temperature1_tokens_per_s": med["ref_b32"],
                    "ratio_ours_t1_over_reference": med["t1_b32"] / med["ref_b32"],
                    "runs": {"greedy": runs["greedy_b32"], "sampling": runs["hot_b32"],
                             "temperature1": runs["t1_b32"], "reference": runs["ref_b32"]}},
    }


def first_token(name: str, path: str, prompt: str) -> dict:
    """nlm generate --bench --json and the reference child, each in a fresh process."""
    from neurallm.inference import (
        Loaded,  # only for the prompt's ids (the reference child has no tokenizer)
    )

    cmd = ["nlm", "generate", path, "--bench", "--json", "--prompt", prompt, "--max-tokens", "300"]
    print("$", " ".join(cmd), flush=True)
    ours = json.loads(fresh(cmd))
    lm = Loaded.open(ROOT / path, slots=1)
    ids = [lm.tokenizer.boundary] + lm.encode(prompt, "prompt")
    ref = json.loads(fresh([sys.executable, __file__, "--child", "reference", str(ROOT / path), "--ids",
                            json.dumps(ids)]))
    return {"command": " ".join(cmd), "ours_first_token_ms": ours["first_token_ms"],
            "ours_peak_rss_mb": ours["peak_rss_mb"], "ours_tokens_per_s": ours["tokens_per_s"],
            "reference_first_token_ms": ref["first_token_ms"], "reference_peak_rss_mb": ref["peak_rss_mb"],
            "prompt_tokens": ours["prompt_tokens"]}


def chat_cost(path: str, turns: int, max_tokens: int, window: int = 30) -> dict:
    """Two conversations on one engine: one taken to 10 turns, one to ``turns``; then ``window`` more
    turns of each, alternating (so a burst of load on the machine hits both alike)."""
    from neurallm.chat import Conversation
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(ROOT / path, slots=1)
    sampling = Sampling(0.8, 0, 0.95)
    early = Conversation(lm, sampling, max_tokens=max_tokens, seed=0)
    late = Conversation(lm, sampling, max_tokens=max_tokens, seed=0)

    def turn(conv):
        for _ in conv.reply(CHAT_MESSAGES[conv.turns % len(CHAT_MESSAGES)]):
            pass
        return conv.last

    t0 = time.perf_counter()
    for _ in range(turns):
        turn(late)
    build = time.perf_counter() - t0
    for _ in range(10):
        turn(early)
    rows = {"early": [], "late": []}
    for _ in range(window):
        for name, conv in (("early", early), ("late", late)):
            rows[name].append(turn(conv))

    def figures(conv, stats, first_turn):
        per_token = [1e6 * s["seconds"] / (s["prompt_tokens"] + s["reply_tokens"]) for s in stats]
        return {"turns": f"{first_turn + 1}-{first_turn + len(stats)}",
                "us_per_new_token_median": median(per_token), "us_per_new_token_min": min(per_token),
                "us_per_new_token_max": max(per_token),
                "first_token_ms_median": median([s["first_token_ms"] for s in stats]),
                "generation_us_per_token_median": median([1e6 / s["tokens_per_s"] for s in stats if s["tokens_per_s"]]),
                "prompt_tokens_median": median([s["prompt_tokens"] for s in stats]),
                "reply_tokens_median": median([s["reply_tokens"] for s in stats]),
                "tokens_behind_state_at_end": conv.context.length}

    a, b = figures(early, rows["early"], 10), figures(late, rows["late"], turns)
    # What a turn would cost if each one re-read the whole conversation (a decoder that keeps no
    # state): one prefill of its last 10,000 tokens, scaled to the whole length (prefill is linear).
    sample = late.tokens[-10_000:]
    t1 = time.perf_counter()
    lm.engine.prefill(sample, lm.start())
    reread = (time.perf_counter() - t1) * (len(late.tokens) - 1) / len(sample)
    return {"checkpoint": path, "sampling": "temperature 0.8, top_p 0.95", "max_tokens": max_tokens,
            "messages": CHAT_MESSAGES, "after_10_turns": a, f"after_{turns}_turns": b,
            "late_over_early": b["us_per_new_token_median"] / a["us_per_new_token_median"],
            f"seconds_first_{turns}_turns": build,
            "reread_whole_conversation_s_estimated": reread, "reread_tokens": len(late.tokens) - 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300, help="tokens per stream per repeat at batch 1")
    parser.add_argument("--tokens-batch32", type=int, default=100, help="tokens per stream per repeat at batch 32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--chat-max-tokens", type=int, default=20)
    parser.add_argument("--long", type=int, default=100_000, help="tokens of the one long stream")
    parser.add_argument("--child", choices=["reference", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("checkpoint", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "reference":
        return child_reference(args)
    if args.child == "memory":
        args.tokens = args.long
        return child_memory(args)

    sys.path.insert(0, str(ROOT))
    from common import write

    started = time.perf_counter()
    trained = {"wt2-full": ensure_checkpoint(*FULL), "char": ensure_checkpoint(*CHAR)}
    models = {"wt2-full": FULL[0], **{k: v for k, v in OPTIONAL.items() if (ROOT / v / "model.safetensors").is_file()}}

    speed = {name: measure_model(name, path, args) for name, path in models.items()}
    ttft = {name: first_token(name, path, WORD_PROMPT) for name, path in models.items()}
    ttft["char"] = {**first_token("char", CHAR[0], CHAR_PROMPT), "note": "the reference child is a 1-layer LSTM here"}
    chat = chat_cost(CHAR[0], args.turns, args.chat_max_tokens)
    cmd = [sys.executable, __file__, "--child", "memory", str(ROOT / CHAR[0]), "--long", str(args.long)]
    memory = json.loads(fresh(cmd))

    write("decode", {
        "checkpoints": trained, "tokens_per_stream": args.tokens, "tokens_per_stream_batch32": args.tokens_batch32,
        "repeats": args.repeats,
        "benchmark_seconds": time.perf_counter() - started,
        "meaning": {
            "reference": "pytorch/examples word_language_model generate.py's loop on the same weights: "
                         "nn.Embedding -> nn.LSTM(2 layers, batch_first) -> nn.Linear (or torch's "
                         "AdaptiveLogSoftmaxWithLoss.log_prob), eager fp32, one token per call, "
                         "log-softmax / T, exp, torch.multinomial, ids to the host each step",
            "speed.MODEL.batch1": "one stream, temperature 1, tokens/s (median of `repeats` runs of "
                                  "`tokens_per_stream` tokens after a warm-up, from the boundary token): "
                                  "ours = Engine with 1 slot, submit + step until done",
            "speed.MODEL.batch32": "32 streams of `tokens_per_stream_batch32` tokens submitted at once, each its own "
                                   "seed, aggregate tokens/s (median of `repeats`): greedy "
                                   "(temperature 0) vs sampling (temperature 0.8, top_k 40, top_p 0.95); "
                                   "sampling_over_greedy_time = greedy tokens/s / sampling tokens/s; "
                                   "temperature1 = plain sampling, to set beside the reference's batch-32 loop",
            "speed.MODEL.first_token_warm": "median of 5, in this process after the runs above: ours = prefill of "
                                            "the prompt + submit + one step; reference = the prompt in one call "
                                            "(log-probabilities at every position, as the example's model gives) "
                                            "+ one sampling step",
            "first_token": "fresh processes (started through sh so ru_maxrss does not inherit this process's): ours = nlm generate --bench --json (first_token_ms from the start "
                           "of the prompt's prefill to the first sampled token; peak RSS of the whole process "
                           "after 300 tokens); reference = the reference loop in a child process that loads the "
                           "safetensors file directly (no neurallm), reads the prompt in one nn.LSTM call, "
                           "samples one token",
            "chat": "Conversation on the character model, short user messages, replies of at most max_tokens: "
                    "per turn, (prompt reading + generation seconds) / (new prompt tokens + reply tokens), in "
                    "microseconds; median/min/max over 30 turns of a conversation past turn 10 and of one past "
                    "the last turn, taken alternately (one turn of each in turn); first_token_ms (prompt "
                    "reading + first step) and generation_us_per_token (the steps after) split it; "
                    "reread_whole_conversation_s_estimated: the time one prefill of the whole conversation takes "
                    "(measured on its last 10,000 tokens, scaled by length), what each turn would cost a decoder "
                    "that keeps no state",
            "long_stream": "a fresh process: Engine with 1 slot, one stream of max_tokens=long at temperature 1 "
                           "on the character model, stepped until done; VmRSS after the first step and every "
                           "10,000 tokens",
        },
        "speed": speed, "first_token": ttft, "chat": chat, "long_stream": {"command": " ".join(cmd[1:]), **memory},
    })


if __name__ == "__main__":
    main()
