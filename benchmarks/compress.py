"""Language modelling as compression: nlm compress beside xz, bzip2, zstd and gzip, on the same files
in one run; every output is decompressed again and compared with the original, byte for byte.

    python benchmarks/compress.py compare    # Tiny Shakespeare, WikiText-2 test, a binary (/bin/bash)
    python benchmarks/compress.py sizes      # model size against speed and size, on Tiny Shakespeare
    python benchmarks/compress.py prior      # 100 kB texts: online, and from a byte-level prior (nlm train)
    python benchmarks/compress.py report     # the README's tables from the results
    python benchmarks/compress.py dynamic    # nlm eval --dynamic on the ptb-small model (runs/ptb-small):
                                             # rates chosen on valid, then test

nlm runs on one thread (--threads 1, the default; decompression uses what the file says). Results go to
benchmarks/results/compress-NAME.json; work files to runs/compress/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, run_json, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NLM_DATA_DIR") or ROOT.parent / "shared" / "data")
WORK = ROOT / "runs" / "compress"
FILES = {"shakespeare": DATA / "tinyshakespeare" / "input.txt", "wikitext2-test": DATA / "wikitext-2" / "test.txt",
         "bash-binary": Path("/bin/bash")}
TOOLS = {"xz -9e": (["xz", "-9e", "-c"], ["xz", "-d", "-c"]), "bzip2 -9": (["bzip2", "-9", "-c"], ["bzip2", "-d", "-c"]),
         "zstd --ultra -22": (["zstd", "--ultra", "-22", "-c", "-q"], ["zstd", "-d", "-c", "-q"]),
         "gzip -9": (["gzip", "-9", "-c"], ["gzip", "-d", "-c"])}
PRIOR = WORK / "prior-wikitext2-bytes"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tool(name: str, src: Path) -> dict:
    pack, unpack = TOOLS[name]
    original = src.read_bytes()
    start = time.perf_counter()
    packed = subprocess.run(pack + [str(src)], capture_output=True, check=True).stdout
    middle = time.perf_counter()
    back = subprocess.run(unpack, input=packed, capture_output=True, check=True).stdout
    end = time.perf_counter()
    assert back == original, f"{name} did not give {src} back"
    return {"bytes": len(packed), "bits_per_byte": 8 * len(packed) / len(original),
            "compress_kb_s": len(original) / (middle - start) / 1e3, "decompress_kb_s": len(original) / (end - middle) / 1e3}


def nlm(src: Path, tag: str, flags: list[str], model: str | None = None) -> dict:
    """nlm compress then nlm decompress, each a fresh process, through their --json reports."""
    WORK.mkdir(parents=True, exist_ok=True)
    packed, back = WORK / f"{tag}.nlmz", WORK / f"{tag}.out"
    prior = ["--model", model] if model else []
    start = time.perf_counter()
    c = run_json(["nlm", "compress", str(src), str(packed), "--force", "--json", "--no-progress", *prior, *flags])
    middle = time.perf_counter()
    d = run_json(["nlm", "decompress", str(packed), str(back), "--force", "--json", "--no-progress", *prior])
    end = time.perf_counter()
    assert back.read_bytes() == src.read_bytes(), f"nlm did not give {src} back"
    back.unlink()
    return {"bytes": c["compressed_bytes"], "bits_per_byte": c["bits_per_byte"], "compress_kb_s": c["bytes_per_s"] / 1e3,
            "decompress_kb_s": d["bytes_per_s"] / 1e3, "compress_seconds": c["seconds"],
            "decompress_seconds": d["seconds"], "flags": flags, "segments": c["segments"],
            # the whole processes, with Python's and torch's start-up (a few seconds):
            "compress_process_seconds": middle - start, "decompress_process_seconds": end - middle}


def compare(flags: list[str]) -> dict:
    files = {}
    for name, src in FILES.items():
        if not src.is_file():
            sys.exit(f"{src}: missing (set NLM_DATA_DIR to the shared data folder)")
        row = {"path": str(src), "bytes": src.stat().st_size, "sha256": sha256(src)}
        row["tools"] = {t: tool(t, src) for t in TOOLS}
        row["nlm"] = nlm(src, name, flags)
        row["nlm_vs_xz"] = row["nlm"]["bytes"] / row["tools"]["xz -9e"]["bytes"]
        row["nlm_vs_bzip2"] = row["nlm"]["bytes"] / row["tools"]["bzip2 -9"]["bytes"]
        files[name] = row
        print(f"{name}: nlm {row['nlm']['bytes']:,} ({row['nlm_vs_xz']:.3f} x xz -9e), "
              f"{row['nlm']['compress_kb_s']:.1f} / {row['nlm']['decompress_kb_s']:.1f} kB/s", flush=True)
    return {"files": files}


def sizes(hidden: list[int]) -> dict:
    src = FILES["shakespeare"]
    return {"file": str(src), "rows": {h: nlm(src, f"sizes-h{h}", ["--hidden", str(h)]) for h in hidden}}


def prior(minutes: float, length: int) -> dict:
    """A byte-level LSTM trained with nlm train on WikiText-2's training text, then 100 kB texts coded
    online and from it: WikiText-2 test (the same kind of text, unseen) and Tiny Shakespeare (another kind)."""
    if not (PRIOR / "model.safetensors").is_file():
        subprocess.run(["nlm", "train", "shakespeare-char", "--out", str(PRIOR), "--data.corpus=wikitext-2",
                        "--data.tokenizer=byte", "--model.num_layers=1", "--model.hidden_size=256",
                        "--model.emb_size=64", "--model.dropout=0", "--model.dropout_hidden=0", "--max-minutes",
                        str(minutes), "--no-progress", "--json"],
                       check=True)
    rows = {}
    for name in ("wikitext2-test", "shakespeare"):
        src = WORK / f"{name}-{length // 1000}k.txt"
        src.write_bytes(FILES[name].read_bytes()[:length])
        rows[name] = {"online": nlm(src, f"{name}-online", []), "prior": nlm(src, f"{name}-prior", [], str(PRIOR)),
                      "prior_no_adapt": nlm(src, f"{name}-prior-fixed", ["--no-adapt"], str(PRIOR))}
        rows[name]["prior_vs_online"] = rows[name]["prior"]["bytes"] / rows[name]["online"]["bytes"]
    return {"prior": str(PRIOR), "prior_minutes": minutes, "length": length, "texts": rows}


def dynamic(checkpoint: str, lrs: list[float], decays: list[float], bptt: int) -> dict:
    """Each (lr, decay) on the validation split; the best of them, once, on test."""
    def run(split: str, lr: float, decay: float) -> dict:
        return run_json(["nlm", "eval", checkpoint, "--split", split, "--json", "--dynamic", "--dynamic.lr", str(lr),
                         "--dynamic.decay", str(decay), "--dynamic.bptt", str(bptt)])

    grid = [{"lr": lr, "decay": decay, **run("valid", lr, decay)} for lr in lrs for decay in decays]
    best = min(grid, key=lambda r: r["perplexity"])
    test = run("test", best["lr"], best["decay"])
    return {"checkpoint": checkpoint, "bptt": bptt, "valid_grid": grid, "chosen": {"lr": best["lr"], "decay": best["decay"]},
            "test": test}


def _results(name: str) -> dict | None:
    path = RESULTS / f"compress-{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _sized(n: dict, digits: int = 3) -> str:
    return f"{n['bytes']:,} ({n['bits_per_byte']:.{digits}f})"


def report() -> str:
    """The README's tables, from the results files."""
    lines = []
    if compare_ := _results("compare"):
        lines += ["| file | bytes | nlm compress | " + " | ".join(TOOLS) + " | nlm / xz | nlm kB/s (compress / decompress) |",
                  "| --- " * (5 + len(TOOLS)) + "|"]
        for name, row in compare_["files"].items():
            n = row["nlm"]
            tools = " | ".join(_sized(row["tools"][t], 2) for t in TOOLS)
            lines.append(f"| {name} | {row['bytes']:,} | **{_sized(n)}** | {tools} | {row['nlm_vs_xz']:.3f} | "
                         f"{n['compress_kb_s']:.1f} / {n['decompress_kb_s']:.1f} |")
    if sizes_ := _results("sizes"):
        lines += ["", "| LSTM units | bytes (bits per byte) | compress kB/s | decompress kB/s |", "| --- " * 4 + "|"]
        lines += [f"| {h} | {_sized(n)} | {n['compress_kb_s']:.1f} | {n['decompress_kb_s']:.1f} |"
                  for h, n in sizes_["rows"].items()]
    if prior_ := _results("prior"):
        kinds = ("online", "prior", "prior_no_adapt")
        lines += ["", "| 100 kB of | online | prior, adapting | prior, fixed | prior / online |", "| --- " * 5 + "|"]
        lines += [f"| {name} | " + " | ".join(_sized(row[k]) for k in kinds) + f" | {row['prior_vs_online']:.3f} |"
                  for name, row in prior_["texts"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("compare")
    p.add_argument("flags", nargs="*", help="nlm compress flags (after --)")
    p = sub.add_parser("sizes")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    p = sub.add_parser("prior")
    p.add_argument("--minutes", type=float, default=20, help="training time of the prior, if it is not there yet")
    p.add_argument("--length", type=int, default=100_000)
    sub.add_parser("report", help="print the README's tables from the results files")
    p = sub.add_parser("dynamic")
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "ptb-small"))
    p.add_argument("--lr", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--decay", type=float, nargs="+", default=[0.0, 0.01])
    p.add_argument("--bptt", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.what == "report":
        print(report())
        return
    if args.what == "compare":
        figures = compare(args.flags)
    elif args.what == "sizes":
        figures = sizes(args.hidden)
    elif args.what == "prior":
        figures = prior(args.minutes, args.length)
    else:
        figures = dynamic(args.checkpoint, args.lr, args.decay, args.bptt)
    write(f"compress-{args.what}", figures)


if __name__ == "__main__":
    main()
