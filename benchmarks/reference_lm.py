"""A plain-PyTorch word language model loop: the baseline the speed benchmark compares against.

The setting of pytorch/examples word_language_model: embedding -> nn.LSTM -> dropout ->
full-softmax Linear, SGD lr 20, gradient clip 0.25, TBPTT 35, batch 20, dropout 0.2,
hidden state carried across windows. Written here without neurallm, as a user would.

    python benchmarks/reference_lm.py DATA_DIR/ptb --train ptb.train.txt --valid ptb.valid.txt --minutes 2

Prints one JSON line: tokens/s (tokens trained over the wall-clock of the whole timed loop,
per-epoch validation included, as nlm train counts them), steps, validation perplexity after
the time budget, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from torch import nn


def read(path: Path, vocab: dict) -> torch.Tensor:
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for word in line.split() + ["<eos>"]:
            ids.append(vocab.setdefault(word, len(vocab)))
    return torch.tensor(ids)


class Model(nn.Module):
    def __init__(self, vocab: int, size: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.out = nn.Linear(size, vocab)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, hidden):
        y, hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return self.out(self.drop(y)), hidden


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n).t().contiguous()  # (time, batch)


def evaluate(model, data, bptt=35) -> float:
    model.eval()
    total, count, hidden = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
            x = x[: y.size(0)]
            logits, hidden = model(x, hidden)
            total += nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--train", default="train.txt")
    parser.add_argument("--valid", default="valid.txt")
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args()
    torch.manual_seed(1111)
    vocab: dict = {}
    train = batchify(read(Path(args.folder) / args.train, vocab), 20)
    valid = batchify(read(Path(args.folder) / args.valid, vocab), 10)
    model = Model(len(vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    bptt, steps, tokens, hidden = 35, 0, 0, None
    start = time.perf_counter()
    while time.perf_counter() - start < args.minutes * 60:
        model.train()
        hidden = None
        for i in range(0, train.size(0) - 1, bptt):
            x, y = train[i:i + bptt], train[i + 1:i + 1 + bptt]
            x = x[: y.size(0)]
            if hidden is not None:
                hidden = tuple(h.detach() for h in hidden)
            logits, hidden = model(x, hidden)
            loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            steps += 1
            tokens += y.numel()
            if time.perf_counter() - start >= args.minutes * 60:
                break
        else:
            evaluate(model, valid)  # pytorch/examples validates after each epoch, inside the timed loop
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / seconds, "steps": steps, "seconds": seconds, "vocab": len(vocab),
                      "valid_perplexity": evaluate(model, valid), "train_loss": loss.item(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
