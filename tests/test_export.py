"""nlm export: ONNX, TorchScript and torch.export files that decode and score as the eager model does,
refused (and nothing written) over their budget, and named when a file is cut or altered."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LSTM as TRAIN
from conftest import last_json

from neurallm import checkpoint
from neurallm import export as export_mod
from neurallm.cli import main
from neurallm.errors import NlmError
from neurallm.runner import EagerRunner

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
onnx_only = pytest.mark.skipif(not HAS_ONNX, reason="the export extra (onnx, onnxruntime) is not installed")
FORMATS = [pytest.param("onnx", marks=onnx_only), "torchscript", "pt2"]
QUIET = lambda _: None
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def train(corpus: Path, out: Path, steps: int, *extra: str) -> Path:
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", str(steps), "--no-progress",
                 f"--data.corpus={corpus}", *TRAIN, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def lm(corpus, tmp_path_factory) -> Path:
    return train(corpus, tmp_path_factory.mktemp("export-lm") / "lstm", 150)


@pytest.fixture(scope="module")
def exports(lm, tmp_path_factory):
    """fmt -> the export of ``lm`` in that format (made once, on first use)."""
    root = tmp_path_factory.mktemp("exports")
    made = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            export_mod.export(lm, fmt, root / fmt, verify_tokens=300, progress=QUIET)
            made[fmt] = root / fmt
        return made[fmt]
    return get


def generate(capsys, ck, *args) -> dict:
    assert main(["generate", str(ck), "--json", *args]) == 0
    return last_json(capsys)


def tree(folder: Path) -> dict:
    """Every file under a folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the same tokens and scores as eager ----------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_and_sampled_tokens_agree_with_eager(lm, exports, fmt, capsys):
    out = exports(fmt)
    record = checkpoint.describe(out)[1]["export"]
    assert record["format"] == fmt and set(record["files"]) == {"step", "prefill", "head"}
    assert record["verified"]["max_logit_diff"] <= 1e-4 and record["verified"]["ppl_rel_diff"] <= 1e-4
    assert record["verified"]["tokens"] == 300
    greedy = ["--temperature", "0", "--max-tokens", "30", "--prompt", "ROMEO:"]
    eager = generate(capsys, lm, *greedy)
    assert eager["generated"] == 30 and len(eager["text"]) == len("ROMEO:") + 30
    assert generate(capsys, out, *greedy) == eager
    sampled = ["--temperature", "0.9", "--top-k", "8", "--seed", "5", "--max-tokens", "30", "--prompt", "First"]
    assert generate(capsys, out, *sampled)["text"] == generate(capsys, lm, *sampled)["text"]


@onnx_only
@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_other_cells_through_onnx_step_within_1e_4_of_eager(corpus, tmp_path, cell, capsys):
    ck = train(corpus, tmp_path / cell, 20, f"--model.cell={cell}", "--model.num_layers=1")
    out = tmp_path / f"{cell}-onnx"
    record = export_mod.export(ck, "onnx", out, verify_tokens=200, progress=QUIET)
    assert record["verified"]["max_logit_diff"] <= 1e-4
    model, _, tokenizer = checkpoint.load(ck)
    exported, _, _ = checkpoint.open_runner(out)
    assert exported.kind == "onnx" and exported.init_state(3).shape == (1, 1, 1, 3, 24)
    ids = tokenizer.encode((corpus / "test.txt").read_text()[:150])
    report = export_mod.compare(EagerRunner(model), exported, ids, tokenizer.boundary, step_tokens=40)
    assert report["tokens"] == 150 and report["max_logit_diff"] <= 1e-4 and report["ppl_rel_diff"] <= 1e-4
    assert export_mod.within(report, export_mod.BUDGET_FP32) == []
    greedy = ["--temperature", "0", "--max-tokens", "20", "--prompt", "ROMEO"]
    assert generate(capsys, out, *greedy) == generate(capsys, ck, *greedy)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prompt_read_at_once_equals_it_stepped_token_by_token(lm, exports, fmt):
    runner, _, tokenizer = checkpoint.open_runner(exports(fmt))
    eager = EagerRunner(checkpoint.load(lm)[0])
    text = "ROMEO: what say you?\nJULIET: none"
    ids = torch.tensor([tokenizer.encode(text[:21]), tokenizer.encode(text[5:26])])  # (2, 16 + 5)
    assert ids.shape == (2, export_mod.PT2_CHUNK + 5)
    if fmt == "pt2":  # one whole chunk through prefill, the 5 left by steps
        assert [(piece.size(1), name) for piece, name in runner._pieces(ids)] == \
            [(export_mod.PT2_CHUNK, "prefill")] + [(1, "step")] * 5
    read = runner.read(ids, runner.init_state(2))
    stepped = runner.init_state(2)
    for t in range(ids.size(1)):
        _, stepped = runner.step(ids[:, t:t + 1], stepped)
    reference = eager.read(ids, eager.init_state(2))
    assert read.shape == reference.shape == (2, 2, 1, 2, 24)
    torch.testing.assert_close(read, stepped, atol=1e-5, rtol=0)
    torch.testing.assert_close(read, reference, atol=1e-5, rtol=0)
    # The next step goes on the same way from either state, and as eager does.
    nxt = torch.tensor([[tokenizer.encode("e")[0]]] * 2)
    after_read, _ = runner.step(nxt, read)
    after_steps, _ = runner.step(nxt, stepped)
    after_eager, _ = eager.step(nxt, reference)
    torch.testing.assert_close(after_read, after_steps, atol=1e-4, rtol=0)
    torch.testing.assert_close(after_read, after_eager, atol=1e-4, rtol=0)
    # Scoring the same 21 tokens (prefill + head, and for pt2 the steps after the chunk) matches eager.
    targets = torch.roll(ids, -1, 1)
    nll, state = runner.nll(ids, targets, runner.init_state(2))
    nll_eager, _ = eager.nll(ids, targets, eager.init_state(2))
    assert nll.shape == (2, 21)
    torch.testing.assert_close(nll, nll_eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(state, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_and_score_on_an_export_match_the_source(lm, exports, fmt, capsys):
    out = exports(fmt)
    for args in ([], ["--batch-size", "3", "--bptt", "40"]):
        assert main(["eval", str(lm), "--json", *args]) == 0
        source = last_json(capsys)
        assert main(["eval", str(out), "--json", *args]) == 0
        exported = last_json(capsys)
        assert exported["tokens"] == source["tokens"] > 1000
        assert exported["perplexity"] == pytest.approx(source["perplexity"], rel=1e-4)
        assert exported["bpc"] == pytest.approx(source["bpc"], rel=1e-4)
    assert main(["score", str(lm), "--text", "ROMEO: hark", "--json"]) == 0
    source = last_json(capsys)
    assert main(["score", str(out), "--text", "ROMEO: hark", "--json"]) == 0
    scored = last_json(capsys)
    assert [t["token"] for t in scored["tokens"]] == list("ROMEO: hark")
    assert [t["logprob"] for t in scored["tokens"]] == pytest.approx([t["logprob"] for t in source["tokens"]],
                                                                      abs=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_step_bytes_of_an_export_equal_the_eager_models(lm, exports, fmt):
    runner = checkpoint.open_runner(exports(fmt))[0]
    eager = EagerRunner(checkpoint.load(lm)[0])
    for batch in (1, 7, 1000):
        assert runner.step_bytes(batch) == eager.step_bytes(batch)
    assert eager.step_bytes(1) < eager.step_bytes(7) < eager.step_bytes(1000)  # embedding rows, up to the vocabulary
    assert runner.model_hash == eager.model_hash + f"+{fmt}"


def test_the_export_verb_writes_a_verified_record(lm, corpus, tmp_path, capsys):
    out = tmp_path / "ts"
    text = corpus / "test.txt"
    args = ["export", str(lm), "--format", "torchscript", "--out", str(out), "--verify-tokens", "100",
            "--verify-file", str(text), "--json"]
    assert main(args) == 0
    record = last_json(capsys)
    assert record["out"] == str(out) and record["format"] == "torchscript"
    assert record["verified"]["tokens"] == 100 and record["verified"]["text"] == str(text)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.pt", "prefill.pt", "step.pt",
                                                     "tokenizer.json"]
    for entry in record["files"].values():
        assert export_mod.sha256(out / entry["file"]) == entry["sha256"]
        assert (out / entry["file"]).stat().st_size == entry["bytes"]
    config = checkpoint.describe(out)[1]
    assert {k: v for k, v in record.items() if k != "out"} == config["export"]
    assert (out / "tokenizer.json").read_bytes() == (lm / "tokenizer.json").read_bytes()
    # Exported again over an earlier export: replaced whole, nothing left beside it.
    assert main(args[:-1]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts"]


def test_an_export_never_replaces_its_source(lm, tmp_path):
    source = tmp_path / "run"
    shutil.copytree(lm, source)
    before = tree(source)
    with pytest.raises(NlmError):
        export_mod.export(source, "torchscript", source, verify_tokens=100, progress=QUIET)
    assert tree(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- refused: nothing written --------------------------------------------------------------------

@onnx_only
def test_an_export_over_its_budget_writes_nothing(lm, tmp_path, capsys):
    out = tmp_path / "exp"
    with pytest.raises(NlmError, match="refused.*nothing was written"):
        export_mod.export(lm, "onnx", out, verify_tokens=200, max_ppl_rel_diff=-1, progress=QUIET)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no .exp.tmp-* left beside it
    assert main(["export", str(lm), "--format", "onnx", "--out", str(out), "--verify-tokens", "200",
                 "--max-ppl-diff", "-1", "--json"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@onnx_only
def test_a_refused_export_leaves_an_existing_out_untouched(lm, exports, tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    shutil.copytree(exports("onnx"), earlier)
    before = tree(earlier)
    monkeypatch.setattr(export_mod, "BUDGET_FP32", {"max_logit_diff": -1.0, "max_ppl_rel_diff": -1.0})
    with pytest.raises(NlmError, match="refused"):
        export_mod.export(lm, "onnx", earlier, verify_tokens=200, progress=QUIET)
    assert tree(earlier) == before
    # A training checkpoint as --out: never replaced by a refused export either.
    run = tmp_path / "run"
    shutil.copytree(lm, run)
    before = tree(run)
    with pytest.raises(NlmError):
        export_mod.export(lm, "onnx", run, verify_tokens=200, progress=QUIET)
    assert tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "run"]


# ---- damaged files are named ---------------------------------------------------------------------

def damaged(capsys, out: Path, path: Path) -> None:
    for args in (["generate", str(out), "--max-tokens", "3"], ["eval", str(out)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(path) in err and "sha256" in err, err


@onnx_only
def test_a_cut_onnx_file_is_named(exports, tmp_path, capsys):
    out = tmp_path / "cut"
    shutil.copytree(exports("onnx"), out)
    step = out / "step.onnx"
    step.write_bytes(step.read_bytes()[: step.stat().st_size // 2])
    damaged(capsys, out, step)


def test_an_altered_torchscript_file_is_named(exports, tmp_path, capsys):
    out = tmp_path / "altered"
    shutil.copytree(exports("torchscript"), out)
    prefill = out / "prefill.pt"
    data = bytearray(prefill.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, the size unchanged
    prefill.write_bytes(bytes(data))
    damaged(capsys, out, prefill)


def test_a_missing_export_file_is_named(exports, tmp_path, capsys):
    out = tmp_path / "missing"
    shutil.copytree(exports("torchscript"), out)
    (out / "head.pt").unlink()
    assert main(["score", str(out), "--text", "ROMEO"]) == 2
    err = capsys.readouterr().err
    assert str(out / "head.pt") in err and "missing" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(NlmError, match="is an export"):  # the model code path needs the source checkpoint
        checkpoint.load(exports("torchscript"))


def test_export_refuses_an_unknown_format_and_keeps_math_finite(lm, tmp_path):
    with pytest.raises(NlmError, match="--format tflite"):
        export_mod.export(lm, "tflite", tmp_path / "x", progress=QUIET)
    assert not (tmp_path / "x").exists()
    assert export_mod.within({"max_logit_diff": math.nan, "ppl_rel_diff": 0.0}, export_mod.BUDGET_FP32)  # NaN fails


@pytest.mark.parametrize("change", ["no-source-hash", "entry-not-an-object", "entry-without-sha256", "file-elsewhere"])
def test_a_malformed_export_record_is_named(exports, tmp_path, capsys, change):
    out = tmp_path / "odd"
    shutil.copytree(exports("torchscript"), out)
    config = json.loads((out / "config.json").read_text())
    record = config["export"]
    if change == "no-source-hash":
        del record["source_hash"]
    elif change == "entry-not-an-object":
        record["files"]["step"] = "step.pt"
    elif change == "entry-without-sha256":
        del record["files"]["head"]["sha256"]
    else:
        record["files"]["prefill"]["file"] = "../prefill.pt"
    (out / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(out), "--max-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert str(out / "config.json") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
