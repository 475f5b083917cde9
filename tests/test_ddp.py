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


def test_two_processes_match_one(word_corpus, tmp_path):
    args = ["train", "ptb-small", "--max-steps", "6", "--no-progress", f"--data.corpus={word_corpus}", *TINY,
            "--train.batch_size=8", "--model.dropout=0", "--model.dropout_input=0", "--model.dropout_hidden=0"]
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
    state = json.loads((tmp_path / "two" / "resume" / "state.json").read_text())
    assert state["world"] == 2
    w1 = load_file(str(tmp_path / "one" / "resume" / "tensors.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "resume" / "tensors.safetensors"))
    for name in w1:
        if name.startswith("model."):
            torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4)
    assert w2["hidden"].shape == w1["hidden"].shape  # both halves of the batch were gathered
    assert not torch.equal(w2["rng.0"], w2["rng.1"])  # each process draws its own dropout masks
