"""The model store through the command line (nlm models, --save-as, short names in every verb) and
nlm bench's side-by-side report."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from conftest import TINY, last_json

from neurallm import export as export_mod
from neurallm import quantize, store
from neurallm.cli import main

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
onnx_only = pytest.mark.skipif(not HAS_ONNX, reason="the export extra (onnx, onnxruntime) is not installed")
HAS_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "httpx", "uvicorn"))
QUIET = lambda _: None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test its own empty store."""
    monkeypatch.setenv("NLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def lm(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models-lm") / "run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "20", "--no-progress",
                 f"--data.corpus={corpus}", *TINY, "--train.save_every=20"]) == 0
    return out


@pytest.fixture(scope="module")
def variants(lm, tmp_path_factory) -> dict:
    """The same model as an int8 checkpoint and (with the export extra) an ONNX export."""
    root = tmp_path_factory.mktemp("models-variants")
    quantize.quantize_checkpoint(lm, "int8", root / "int8", tokens=300, max_increase=math.inf, progress=QUIET)
    made = {"int8": root / "int8"}
    if HAS_ONNX:
        export_mod.export(lm, "onnx", root / "onnx", verify_tokens=200, progress=QUIET)
        made["onnx"] = root / "onnx"
    return made


def add_all(lm, variants, capsys) -> dict:
    names = {"bard": lm, "bard-int8": variants["int8"], **({"bard-onnx": variants["onnx"]} if "onnx" in variants else {})}
    for name, path in names.items():
        assert main(["models", "add", str(path), name]) == 0
        assert capsys.readouterr().out.startswith(f"added {name}: ")
    return names


KINDS = {"bard": "LM", "bard-int8": "quantized (int8)", "bard-onnx": "exported (onnx)"}


def test_the_listing_tells_each_kind(lm, variants, home, capsys):
    names = add_all(lm, variants, capsys)
    assert {e["name"]: e["kind"] for e in store.entries()} == {n: KINDS[n] for n in names}
    assert main(["models", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["NAME", "KIND"]
    listed = {row.split("  ")[0].strip(): row for row in rows[1:]}
    assert set(listed) == set(names)
    for name in names:
        assert KINDS[name] in listed[name]
    assert main(["models", "where", "bard-int8"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / "bard-int8")


def test_the_listing_as_json(lm, variants, home, capsys):
    names = add_all(lm, variants, capsys)
    assert main(["models", "list", "--json"]) == 0
    listing = last_json(capsys)
    assert listing["home"] == str(home)
    assert {m["name"]: m["kind"] for m in listing["models"]} == {n: KINDS[n] for n in names}
    assert all(m["path"] == str(home / "models" / m["name"]) for m in listing["models"])


def test_an_empty_store_lists_as_json(home, capsys):
    assert main(["models", "list", "--json"]) == 0
    assert last_json(capsys) == {"home": str(home), "models": []}


def test_a_stored_name_works_in_every_verb(lm, variants, home, tmp_path, monkeypatch, capsys):
    add_all(lm, variants, capsys)
    monkeypatch.chdir(tmp_path)  # no folder here is called bard
    greedy = ["--prompt", "ROMEO:", "--temperature", "0", "--max-tokens", "15", "--json"]
    for name, path in (("bard", lm), ("bard-int8", variants["int8"]), ("bard-onnx", variants.get("onnx"))):
        if path is None:
            continue
        assert main(["generate", name, *greedy]) == 0
        by_name = last_json(capsys)
        assert main(["generate", str(path), *greedy]) == 0
        assert last_json(capsys) == by_name and by_name["generated"] == 15
        assert main(["eval", name, "--json"]) == 0
        evaluated = last_json(capsys)
        assert main(["eval", str(path), "--json"]) == 0
        assert last_json(capsys)["perplexity"] == evaluated["perplexity"]

    if HAS_SERVE:  # nlm serve's own loader, given a name (uvicorn.run stood in for)
        import uvicorn
        from fastapi.testclient import TestClient

        from neurallm.serve.app import serve

        apps = []
        monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
        assert serve(["bard", "bard-int8"], slots=2) == 0
        with TestClient(apps[0]) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["bard", "bard-int8"]
            r = client.post("/v1/chat/completions", json={"model": "bard-int8", "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        assert "serving bard, bard-int8" in capsys.readouterr().out

    assert main(["models", "rename", "bard", "verse"]) == 0
    assert capsys.readouterr().out.startswith("renamed bard to verse")
    assert main(["generate", "verse", *greedy]) == 0
    last_json(capsys)
    assert main(["models", "rename", "verse", "bard-int8"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["models", "remove", "verse"]) == 0
    assert capsys.readouterr().out.strip() == "removed verse"
    assert [e["name"] for e in store.entries()] == ["bard-int8"] + (["bard-onnx"] if "onnx" in variants else [])
    assert not (home / "models" / "verse").exists() and not (home / "models" / "bard").exists()
    assert [p.name for p in (home / "models").iterdir() if p.name.startswith(".")] == []
    assert lm.is_dir() and (lm / "model.safetensors").is_file()  # the source is never touched


def test_an_unknown_name_is_one_clear_line(capsys):
    for args in (["generate", "nosuch", "--max-tokens", "2"], ["eval", "nosuch"], ["models", "remove", "nosuch"],
                 ["models", "where", "nosuch"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "nosuch" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["generate", "nosuch"]) == 2
    assert "no stored model of that name" in capsys.readouterr().err
    assert main(["models", "add", "/nonexistent/ck", "x"]) == 2
    assert main(["models", "add", "a", "b", "c"]) == 2
    assert "nlm models add CHECKPOINT NAME" in capsys.readouterr().err


def test_train_save_as_stores_the_result_and_refuses_a_taken_name(corpus, home, tmp_path, capsys):
    args = ["train", "shakespeare-char", "--max-steps", "3", "--no-progress", "--json", f"--data.corpus={corpus}",
            *TINY]
    assert main([*args, "--out", str(tmp_path / "r1"), "--save-as", "tiny"]) == 0
    summary = last_json(capsys)
    assert summary["saved_as"] == str(home / "models" / "tiny")
    stored = home / "models" / "tiny"
    assert (stored / "model.safetensors").read_bytes() == (tmp_path / "r1" / "model.safetensors").read_bytes()
    assert not (stored / "resume").exists()  # the run's resume state is not part of the model
    assert [e["name"] for e in store.entries()] == ["tiny"]
    assert main(["generate", "tiny", "--max-tokens", "3", "--json"]) == 0
    assert last_json(capsys)["generated"] == 3
    # A taken name is refused before any training: no run directory appears.
    assert main([*args, "--out", str(tmp_path / "r2"), "--save-as", "tiny"]) == 2
    assert "--save-as tiny" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert main([*args, "--out", str(tmp_path / "r3"), "--save-as", ".hidden"]) == 2
    assert "not a valid model name" in capsys.readouterr().err and not (tmp_path / "r3").exists()


@onnx_only
def test_bench_reports_a_row_per_variant(lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the generate --bench processes it starts
    work = tmp_path / "work"
    assert main(["bench", str(lm), "--variants", "eager,int8,onnx", "--max-tokens", "5", "--eval-tokens", "200",
                 "--work", str(work), "--json"]) == 0
    result = last_json(capsys)
    assert [r["variant"] for r in result["variants"]] == ["eager", "int8", "onnx"]
    assert [r["kind"] for r in result["variants"]] == ["eager", "eager", "onnx"]
    for row in result["variants"]:
        for key in ("tokens_per_s_batch1", "tokens_per_s_batch32", "first_token_ms", "perplexity", "bpc",
                    "peak_rss_mb", "bandwidth_gb_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["variant"], key)
        assert row["bpc"] == pytest.approx(math.log2(row["perplexity"]))
        assert isinstance(row["bytes"], int) and row["bytes"] > 0
    eager, int8, onnx = result["variants"]
    assert onnx["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-4)
    assert int8["bytes"] < eager["bytes"]
    assert result["eval_tokens"] == 200 and math.isfinite(result["memory_bandwidth_gb_s"])
    assert (work / "int8" / "config.json").is_file() and (work / "onnx" / "step.onnx").is_file()
    assert main(["bench", str(lm), "--variants", "eager,fp8"]) == 2
    assert "--variants: unknown fp8" in capsys.readouterr().err


def test_generate_bench_reports_bandwidth(lm, capsys):
    assert main(["generate", str(lm), "--bench", "--max-tokens", "8", "--json"]) == 0
    result = last_json(capsys)
    assert result["kind"] == "eager" and result["tokens"] == 8
    from neurallm import checkpoint
    from neurallm.runner import step_bytes

    assert result["weight_bytes_per_step"] == step_bytes(checkpoint.load(lm)[0], 1)
    assert result["bandwidth_gb_s"] == pytest.approx(result["weight_bytes_per_step"] * result["tokens_per_s"] / 1e9)
    assert result["memory_bandwidth_gb_s"] > 0.1
