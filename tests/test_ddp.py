"""Data-parallel training: 2 processes (gloo on CPU) match 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import TINY


def losses(out):
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def valid_losses(out):
    return [r["valid_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "valid_loss" in r]


def test_two_processes_match_one(word_corpus, tmp_path):
    # One validation row for two processes: rank 1 validates nothing and still gets the figure.
    args = ["train", "ptb-small", "--max-steps", "6", "--no-progress", f"--data.corpus={word_corpus}", *TINY,
            "--train.batch_size=8", "--train.eval_batch_size=1", "--model.dropout=0", "--model.dropout_input=0",
            "--model.dropout_hidden=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "neurallm", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "neurallm", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trained 6 steps") == 1  # one summary, rank 0's
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-5 * abs(a), (one, two)
    v1, v2 = valid_losses(tmp_path / "one"), valid_losses(tmp_path / "two")
    assert len(v1) == len(v2) == 1 and abs(v1[0] - v2[0]) < 1e-5 * v1[0]
    state = json.loads((tmp_path / "two" / "resume" / "state.json").read_text())
    assert state["world"] == 2
    w1 = load_file(str(tmp_path / "one" / "resume" / "tensors.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "resume" / "tensors.safetensors"))
    for name in w1:
        if name.startswith("model."):
            torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4)
    assert w2["hidden"].shape == w1["hidden"].shape  # both halves of the batch were gathered
    assert not torch.equal(w2["rng.0"], w2["rng.1"])  # each process draws its own dropout masks


# Run under torchrun: counts who trains a tokenizer, and can make one rank fail on its own.
PROBE = """
import os, sys
from pathlib import Path
from neurallm import train as train_mod
from neurallm.cli import main

made = train_mod.make_tokenizer
def counted(*args):
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return made(*args)
train_mod.make_tokenizer = counted

step = train_mod.Trainer.train_step
def failing(self, index, lr):
    if self.rank == 1 and self.progress.step == int(os.environ.get("FAIL_AT", "-1")):
        raise RuntimeError("rank 1 fails alone")
    return step(self, index, lr)
train_mod.Trainer.train_step = failing
sys.exit(main(sys.argv[1:]))
"""


def torchrun(script, args, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_one_tokenizer_shared_validation_split_and_a_lone_failure_ends_the_run(word_corpus, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    log = tmp_path / "made.txt"
    args = ["train", "ptb-small", "--max-steps", "25", "--no-progress", f"--data.corpus={word_corpus}", *TINY,
            "--train.batch_size=8", "--train.eval_batch_size=3", "--model.dropout=0", "--model.dropout_input=0",
            "--model.dropout_hidden=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_LOG": str(log)}
    ddp = torchrun(script, [*args, "--out", str(tmp_path / "two")], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert log.read_text() == "0\n"  # the tokenizer was built once, by rank 0, and sent to rank 1
    single = subprocess.run([sys.executable, "-m", "neurallm", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    one, two = valid_losses(tmp_path / "one"), valid_losses(tmp_path / "two")
    assert len(one) == len(two) >= 1
    for a, b in zip(one, two):  # 3 validation rows split 2 + 1 between the processes
        assert abs(a - b) < 1e-5 * a, (one, two)
    failed = torchrun(script, [*args, "--out", str(tmp_path / "fail")], {**env, "FAIL_AT": "4"})
    assert failed.returncode != 0 and "rank 1 fails alone" in failed.stderr


def test_a_tagger_trains_on_two_processes(tmp_path):
    """The task-free loop runs a tagger data-parallel too: each process takes its share of a batch's
    sentences (the last, smaller batch included), rank 0 alone writes the checkpoint."""
    from conftest import need

    src = need("ud-english-ewt", "en_ewt-ud-dev.conllu")
    data = tmp_path / "ud"
    data.mkdir()
    blocks = src.read_text(encoding="utf-8").split("\n\n")
    (data / "train.conllu").write_text("\n\n".join(blocks[:21]) + "\n\n", encoding="utf-8")  # 21: a last batch of 1
    (data / "dev.conllu").write_text("\n\n".join(blocks[21:31]) + "\n\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "neurallm", "tag", "train", "ud-ewt-upos", "--out", str(tmp_path / "two"),
                          "--max-steps", "6", "--no-progress", "--json", f"--data.corpus={data}",
                          "--train.batch_size=10", "--model.hidden_size=16", "--model.emb_size=16",
                          "--task.char_size=8"], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads(ddp.stdout.strip().splitlines()[-1])  # one summary: rank 0's
    assert summary["steps"] == 6 and summary["processes"] == 2 and summary["epochs_completed"] == 2
    assert (tmp_path / "two" / "model.safetensors").is_file()
    state = json.loads((tmp_path / "two" / "resume" / "state.json").read_text())
    assert state["world"] == 2
