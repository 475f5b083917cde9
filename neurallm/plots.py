"""Training curves: train and validation loss against steps (a tagger's or classifier's dev
accuracy and F1 beside them), next to the checkpoint."""

from __future__ import annotations

from pathlib import Path

from neurallm.checkpoint import read_jsonl


def training_curves(metrics: Path, out: Path) -> Path | None:
    """Plot metrics.jsonl to a PNG; returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_jsonl(Path(metrics))
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    # A tagger's or classifier's validation figure: accuracy, and F1 for entities, on a second axis.
    scored = [key for key in ("valid_accuracy", "valid_f1") if any(key in r for r in records)]
    if scored:
        right = ax.twinx()
        for key, style in zip(scored, ("s-", "^-")):
            points = [(r["step"], 100 * r[key]) for r in records if key in r]
            right.plot(*zip(*points), style, color="tab:green" if key == "valid_accuracy" else "tab:red",
                       label=f"dev {key[6:]}")
        right.set_ylabel("dev %")
        right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
