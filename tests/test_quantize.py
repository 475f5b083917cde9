"""nlm quantize: int8, int4-weight and bf16 checkpoints that every verb loads, within their perplexity
budgets; mixed recipes; bad recipes named; refusals write nothing; int8 through ONNX."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LSTM as TRAIN
from conftest import last_json
from torch import nn

from neurallm import checkpoint, quantize
from neurallm import export as export_mod
from neurallm.cli import main
from neurallm.errors import NlmError
from neurallm.models import quantized
from neurallm.models.stack import Layer
from neurallm.runner import EagerRunner

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
onnx_only = pytest.mark.skipif(not HAS_ONNX, reason="the export extra (onnx, onnxruntime) is not installed")
HAS_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "httpx"))
QUIET = lambda _: None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantize") / "lstm"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "150", "--no-progress",
                 f"--data.corpus={corpus}", *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def int8(lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "q"
    quantize.quantize_checkpoint(lm, "int8", out, tokens=400, progress=QUIET)
    return out


def write_recipe(path: Path, recipe) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe), encoding="utf-8")
    return path


# ---- each scheme, through every verb --------------------------------------------------------------

SCHEMES = [("int8", None), ("int4-weight", {"scheme": "int4-weight", "group_size": 32}), ("bf16", None)]


@pytest.mark.parametrize("scheme, recipe", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_each_scheme_loads_everywhere_within_its_budget(lm, tmp_path, scheme, recipe, capsys, monkeypatch):
    out = tmp_path / scheme
    how = ["--recipe", str(write_recipe(tmp_path / "recipe.json", recipe))] if recipe else ["--scheme", scheme]
    assert main(["quantize", str(lm), *how, "--out", str(out), "--json"]) == 0
    record = last_json(capsys)
    v = record["validation"]
    assert record["scheme"] == scheme and record["out"] == str(out)
    assert v["budget"] == quantize.BUDGETS[scheme] and v["increase"] <= v["budget"]
    assert v["increase"] == pytest.approx(v["perplexity"] / v["perplexity_fp32"] - 1)
    assert v["bytes"] == (out / "model.safetensors").stat().st_size < v["bytes_fp32"]
    assert checkpoint.describe(out)[1]["quantization"]["parts"] == record["parts"]

    model = checkpoint.load(out)[0]
    if scheme == "int4-weight":  # 24 columns padded to one group of 32
        assert record["group_size"] == 32
        assert isinstance(model.decoder, quantized.Int4Linear) and model.decoder.weights.group == 32
        assert model.decoder.weights.packed.shape == (model.cfg.vocab_size, 16)
        assert isinstance(model.embedding, quantized.QuantEmbedding) and model.embedding.precision == "int4"
        assert all(type(layer) is Layer for layer in model.stack.layers)
    else:
        assert all(isinstance(layer, quantized.QuantLayer) for layer in model.stack.layers)
        assert isinstance(model.decoder, quantize.LINEAR[scheme])

    # eval: the whole validation split, as the quantizer measured it (its 20000 tokens cover the split)
    assert main(["eval", str(out), "--json"]) == 0
    evaluated = last_json(capsys)
    assert evaluated["tokens"] == v["tokens"] and evaluated["perplexity"] == pytest.approx(v["perplexity"], rel=1e-6)
    assert main(["eval", str(lm), "--json"]) == 0
    assert last_json(capsys)["perplexity"] == pytest.approx(v["perplexity_fp32"], rel=1e-6)

    assert main(["score", str(out), "--text", "ROMEO: hark", "--json"]) == 0
    scored = last_json(capsys)
    assert scored["count"] == 11 and all(-20 < t["logprob"] <= 0 for t in scored["tokens"])

    assert main(["generate", str(out), "--prompt", "ROMEO:", "--temperature", "0", "--max-tokens", "20",
                 "--json"]) == 0
    generated = last_json(capsys)
    assert generated["generated"] == 20 and generated["text"].startswith("ROMEO:")

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/quit\n"))
    assert main(["chat", str(out), "--temperature", "0", "--max-tokens", "10"]) == 0
    chat = capsys.readouterr()
    assert "JULIET> " in chat.out and chat.err == ""

    if HAS_SERVE:
        from fastapi.testclient import TestClient

        from neurallm.inference import Loaded
        from neurallm.serve.app import create_app

        served = Loaded.open(out, slots=2)
        with TestClient(create_app({served.name: served})) as client:
            r = client.post("/v1/chat/completions", json={"model": served.name, "max_tokens": 5, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 5 and isinstance(r.json()["choices"][0]["message"]["content"],
                                                                          str)


# ---- recipes ---------------------------------------------------------------------------------------

def test_a_mixed_recipe_sets_each_part(lm, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "mixed.json",
                          {"scheme": "int8", "layers": {"stack.0": "fp32", "decoder": "int4"}, "group_size": 32})
    out = tmp_path / "mixed"
    assert main(["quantize", str(lm), "--recipe", str(recipe), "--out", str(out), "--json"]) == 0
    record = last_json(capsys)
    assert record["parts"] == {"embedding": "fp32", "stack.0": "fp32", "stack.1": "int8", "decoder": "int4"}
    model = checkpoint.load(out)[0]
    assert type(model.stack.layers[0]) is Layer
    assert isinstance(model.stack.layers[1], quantized.QuantLayer)
    assert isinstance(model.stack.layers[1].ih[0], quantized.Int8Linear)
    assert isinstance(model.decoder, quantized.Int4Linear) and model.decoder.weights.group == 32
    assert type(model.embedding) is nn.Embedding
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-tokens", "5", "--json"]) == 0
    assert last_json(capsys)["generated"] == 5


@pytest.mark.parametrize("recipe, message", [
    ({"scheme": "int8", "bits": 4}, "unknown key(s) bits"),
    ({"scheme": "int8", "layers": {"encoder": "int8"}}, "layers.encoder: no such part"),
    ({"scheme": "int8", "layers": {"stack.2": "int8"}}, "layers.stack.2: no such part"),
    ({"scheme": "int8", "layers": {"decoder": "int2"}}, "layers.decoder = 'int2'"),
    ({"scheme": "int8", "layers": "fp32"}, "layers must be an object"),
    ({"scheme": "int3"}, "scheme 'int3'"),
    ({"scheme": "int4-weight", "group_size": 48}, "group_size 48"),
    ({"scheme": "int4-weight", "group_size": 256}, "group_size 256 is larger than"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
], ids=["unknown-key", "unknown-part", "no-such-layer", "unknown-precision", "layers-not-object", "unknown-scheme",
        "group-48", "group-wider-than-model", "not-json", "not-object"])
def test_bad_recipes_are_named(lm, tmp_path, recipe, message, capsys):
    path = write_recipe(tmp_path / "recipe.json", recipe)
    out = tmp_path / "out"
    assert main(["quantize", str(lm), "--recipe", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(NlmError, match=str(path)):
        quantize.plan_of(checkpoint.load(lm)[0], "int8", quantize.read_recipe(path), str(path))


def test_over_budget_writes_nothing(lm, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(lm), "--scheme", "int8", "--out", str(out), "--max-increase", "-1",
                 "--tokens", "200"]) == 2
    err = capsys.readouterr().err
    assert "quantization refused" in err and "nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no .q.tmp-* either
    again = tmp_path / "bf16"  # and a quantized checkpoint is not quantized again
    quantize.quantize_checkpoint(lm, "bf16", again, tokens=200, progress=QUIET)
    with pytest.raises(NlmError, match="quantized already"):
        quantize.quantize_checkpoint(again, "int8", out, progress=QUIET)
    assert not out.exists()


def test_quantizing_never_replaces_the_source(lm, tmp_path):
    source = tmp_path / "run"
    shutil.copytree(lm, source)
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    with pytest.raises(NlmError):
        quantize.quantize_checkpoint(source, "bf16", source, tokens=200, progress=QUIET)
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- bytes a step reads -----------------------------------------------------------------------------

def test_int8_reads_under_half_the_bytes_of_fp32_a_step(lm, int8):
    fp32 = checkpoint.load(lm)[0]
    quantized = checkpoint.load(int8)[0]
    # int8: one byte a weight plus a float32 scale per row; biases stay float32; the fp32 embedding, a row a token.
    expected = 0
    for name, p in fp32.named_parameters():
        if name.startswith("embedding."):
            continue
        expected += p.numel() + 4 * p.size(0) if p.dim() == 2 else 4 * p.numel()
    row = 4 * fp32.cfg.emb_size
    for batch in (1, 5):
        assert EagerRunner(quantized).step_bytes(batch) == expected + batch * row
        assert EagerRunner(quantized).step_bytes(batch) < EagerRunner(fp32).step_bytes(batch) / 2
    assert EagerRunner(fp32).step_bytes(1) == 4 * sum(p.numel() for n, p in fp32.named_parameters()
                                                        if not n.startswith("embedding.")) + row


# ---- quantized to ONNX ---------------------------------------------------------------------------------

@onnx_only
def test_int8_exports_to_onnx_with_int8_operators(int8, tmp_path, capsys):
    import onnx

    out = tmp_path / "int8-onnx"
    record = export_mod.export(int8, "onnx", out, verify_tokens=300, progress=QUIET)
    assert record["verified"]["budget"] == {"max_logit_diff": None, "max_ppl_rel_diff": 0.01}
    assert record["verified"]["ppl_rel_diff"] <= 0.01
    ops = {name: {n.op_type for n in onnx.load(str(out / f"{name}.onnx")).graph.node} for name in ("step", "prefill")}
    assert ops["step"] & {"MatMulInteger", "DynamicQuantizeLSTM"}, ops["step"]
    assert "DynamicQuantizeLSTM" in ops["prefill"], ops["prefill"]  # the recurrent layers, int8
    assert checkpoint.describe(out)[1]["quantization"]["scheme"] == "int8"
    with pytest.raises(NlmError, match="is an export"):
        quantize.quantize_checkpoint(out, "int8", tmp_path / "again", progress=QUIET)

    eager, _, tokenizer = checkpoint.open_runner(int8)
    exported = checkpoint.open_runner(out)[0]
    assert exported.step_bytes(1) == eager.step_bytes(1) and exported.step_bytes(9) == eager.step_bytes(9)
    # The step function's choices, teacher-forced over held-out text, mostly agree with the quantized eager model.
    text = (Path(checkpoint.load(int8)[1].data.corpus) / "test.txt").read_text()[:200]
    ids = torch.tensor([tokenizer.boundary] + tokenizer.encode(text)).view(-1, 1)
    agree = 0
    s_eager, s_onnx = eager.init_state(1), exported.init_state(1)
    for t in range(ids.size(0)):
        l_eager, s_eager = eager.step(ids[t:t + 1], s_eager)
        l_onnx, s_onnx = exported.step(ids[t:t + 1], s_onnx)
        agree += int(l_eager.argmax()) == int(l_onnx.argmax())
    assert agree >= 0.9 * ids.size(0)
    greedy = ["--prompt", "ROMEO:", "--temperature", "0", "--max-tokens", "30", "--json"]
    assert main(["generate", str(int8), *greedy]) == 0
    a = last_json(capsys)["text"]
    assert main(["generate", str(out), *greedy]) == 0
    b = last_json(capsys)["text"]
    assert sum(x == y for x, y in zip(a, b)) >= 0.6 * len(a)


@onnx_only
def test_int4_weight_exports_to_onnx(lm, tmp_path):
    q = tmp_path / "int4"
    quantize.quantize_checkpoint(lm, "int4-weight", q, tokens=200, progress=QUIET)
    record = export_mod.export(q, "onnx", tmp_path / "int4-onnx", verify_tokens=200, progress=QUIET)
    assert record["verified"]["ppl_rel_diff"] <= 1e-4


@onnx_only
def test_a_tied_model_with_mixed_precisions_widens_each_part_as_it_is(lm, tmp_path):
    corpus = checkpoint.load(lm)[1].data.corpus
    tied = tmp_path / "tied"
    assert main(["train", "shakespeare-char", "--out", str(tied), "--max-steps", "20", "--no-progress",
                 f"--data.corpus={corpus}", *TRAIN, "--model.tie_weights=true"]) == 0
    recipe = write_recipe(tmp_path / "r.json", {"scheme": "bf16", "layers": {"stack": "fp32", "decoder": "fp32"}})
    q = tmp_path / "q"
    quantize.quantize_checkpoint(tied, None, q, recipe_file=str(recipe), tokens=200, progress=QUIET)
    model = checkpoint.load(q)[0]
    plain = quantize.widened(model)
    assert torch.equal(plain.embedding.weight, model.embedding.dequantized())
    assert torch.equal(plain.decoder.weight, model.decoder.weight)  # fp32, as the quantized model has it
    export_mod.export(q, "onnx", tmp_path / "onnx", verify_tokens=200, progress=QUIET)


def test_a_quantized_checkpoint_exports_to_onnx_only(int8, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["export", str(int8), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ONNX only" in err and str(int8) in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_altered_quantized_weights_are_named(int8, tmp_path, capsys):
    copy = tmp_path / "q"
    shutil.copytree(int8, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of int8 data: safetensors itself would load this
    weights.write_bytes(bytes(data))
    assert main(["eval", str(copy), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "sha256" in err and "Traceback" not in err


def test_a_quantized_checkpoint_refuses_cuda(int8, capsys):
    assert main(["generate", str(int8), "--device", "cuda", "--max-tokens", "3"]) == 2
    assert "runs on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("record", [{"scheme": ["int8"]}, {"scheme": "int8", "group_size": 64.0}],
                         ids=["scheme-not-a-string", "group-size-not-an-integer"])
def test_odd_values_in_a_recipe_are_named(lm, tmp_path, record, capsys):
    path = write_recipe(tmp_path / "recipe.json", record)
    assert main(["quantize", str(lm), "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
