"""The model store: add, list, find, rename and remove checkpoints by name; nothing stored is ever lost."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from neurallm import checkpoint, config, store
from neurallm.data.tokenizers import CharTokenizer
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM


@pytest.fixture(autouse=True)
def store_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty store."""
    monkeypatch.setenv("NLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A real (untrained) character checkpoint, laid out as a training run leaves it."""
    tok = CharTokenizer.train("to be or not to be\n")
    recipe = config.Recipe(data=config.DataConfig(corpus="tinyshakespeare", tokenizer="char"),
                           model=config.ModelConfig(vocab_size=tok.vocab_size, emb_size=8, hidden_size=8, num_layers=1))
    out = tmp_path / "run"
    info = {"step": 8, "valid_loss": 1.5, "valid_perplexity": math.exp(1.5), "valid_bpc": 1.5 / math.log(2)}
    checkpoint.save(out, RNNLM(recipe.model), recipe, tok, extra=info)  # info as train.py records it
    (out / "metrics.jsonl").write_text('{"step": 8}\n')
    (out / "resume").mkdir()
    (out / "resume" / "state.json").write_text("{}")
    (out / ".lock").write_text("")
    return out


def fake_checkpoint(folder: Path, cfg: dict, weights: bytes = b"\0" * 100) -> Path:
    """Only what the listing reads: config.json and a weights file of known size."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def hidden(store_home: Path) -> list[str]:
    return [p.name for p in (store_home / "models").iterdir() if p.name.startswith(".")]


def test_add_list_where_rename_remove(run_dir, store_home):
    stored = store.add(run_dir, "bard")
    assert stored == store_home / "models" / "bard" and store.where("bard") == stored
    shutil.rmtree(run_dir)  # the stored copy stands alone
    model, recipe, tok = checkpoint.load(store.resolve("bard"))
    assert recipe.data.corpus == "tinyshakespeare" and tok.vocab_size == model.cfg.vocab_size

    [entry] = store.entries()
    files = [p for p in stored.rglob("*") if p.is_file()]
    assert entry["name"] == "bard" and entry["path"] == stored and entry["kind"] == "LM"
    assert entry["corpus"] == "tinyshakespeare" and entry["validation"] == "bpc 2.164"
    assert entry["size_bytes"] == sum(p.stat().st_size for p in files) > 0
    assert len(entry["date"]) == len("2024-01-31 12:00") and entry["date"][4] == "-"

    assert store.rename("bard", "juliet") == store_home / "models" / "juliet"
    assert [e["name"] for e in store.entries()] == ["juliet"]
    with pytest.raises(NlmError, match="no stored model named bard"):
        store.where("bard")
    store.remove("juliet")
    assert store.entries() == [] and list((store_home / "models").iterdir()) == []


def test_add_skips_what_belongs_to_the_training_run(run_dir):
    (run_dir / "sub").mkdir()
    (run_dir / "sub" / "other.lock").write_text("")
    (run_dir / "sub" / "kept.txt").write_text("x")
    (run_dir / ".resume.old-123").mkdir()
    stored = store.add(run_dir, "bard")
    names = sorted(str(p.relative_to(stored)) for p in stored.rglob("*"))
    assert names == ["config.json", "metrics.jsonl", "model.safetensors", "sub", "sub/kept.txt", "tokenizer.json"]


def test_a_taken_name_is_refused_and_the_stored_model_kept(run_dir, tmp_path, store_home):
    store.add(run_dir, "bard")
    before = (store_home / "models" / "bard" / "config.json").read_bytes()
    other = fake_checkpoint(tmp_path / "other", {"data": {"corpus": "ptb"}})
    with pytest.raises(NlmError, match=r"a stored model named bard exists already \(nlm models remove bard"):
        store.add(other, "bard")
    with pytest.raises(NlmError, match="a stored model named bard exists already"):
        store.rename("bard", "bard")
    assert (store_home / "models" / "bard" / "config.json").read_bytes() == before
    assert hidden(store_home) == []
    store.add(other, "bard", force=True)
    assert [e["corpus"] for e in store.entries()] == ["ptb"]
    assert hidden(store_home) == []  # the replaced copy is gone too


def test_a_failed_copy_loses_nothing(run_dir, tmp_path, store_home, monkeypatch):
    store.add(run_dir, "bard")
    before = sorted(p.name for p in (store_home / "models" / "bard").iterdir())

    def half_copies(src, dst, **kwargs):
        (Path(dst) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.shutil, "copytree", half_copies)
    other = fake_checkpoint(tmp_path / "other", {"data": {"corpus": "ptb"}})
    for name, force in (("bard", True), ("new", False)):
        with pytest.raises(NlmError, match=f"could not be copied to .*{name}.*No space left"):
            store.add(other, name, force=force)
    assert sorted(p.name for p in (store_home / "models" / "bard").iterdir()) == before
    assert [e["name"] for e in store.entries()] == ["bard"] and hidden(store_home) == []


def test_a_crash_between_the_renames_of_a_replacement_is_undone(run_dir, tmp_path, store_home):
    store.add(run_dir, "bard")
    models = store_home / "models"
    os.replace(models / "bard", models / ".bard.old-999")  # replace_dir had set the old copy aside, then died
    other = fake_checkpoint(tmp_path / "other", {"data": {"corpus": "ptb"}})
    with pytest.raises(NlmError, match="exists already"):
        store.add(other, "bard")
    assert store.entries()[0]["corpus"] == "tinyshakespeare" and hidden(store_home) == []


def test_unknown_names(run_dir):
    for verb, args in ((store.where, ("ghost",)), (store.remove, ("ghost",)), (store.rename, ("ghost", "other"))):
        with pytest.raises(NlmError, match=r"no stored model named ghost in .*models \(nlm models list shows them\)"):
            verb(*args)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../up", "-dash", "sp ace", "x" * 65, "name\n", "é"])
def test_invalid_names_are_refused(name, run_dir, store_home):
    with pytest.raises(NlmError, match="not a valid model name .*letters, digits"):
        store.add(run_dir, name)
    store.add(run_dir, "ok")
    with pytest.raises(NlmError, match="not a valid model name"):
        store.rename("ok", name)
    assert [e["name"] for e in store.entries()] == ["ok"]


def test_valid_names(run_dir):
    for name in ("a", "x" * 64, "PTB-small_2.v1", "9lives"):
        assert store.add(run_dir, name).name == name
    assert [e["name"] for e in store.entries()] == sorted(["a", "x" * 64, "PTB-small_2.v1", "9lives"])


def test_bad_sources(run_dir, tmp_path):
    with pytest.raises(NlmError, match=r"nothing: no such checkpoint directory"):
        store.add(tmp_path / "nothing", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NlmError, match=r"empty: not a checkpoint directory \(no config.json\)"):
        store.add(tmp_path / "empty", "a")
    stored = store.add(run_dir, "bard")
    with pytest.raises(NlmError, match="is the stored model bard itself"):
        store.add(stored, "bard", force=True)
    assert checkpoint.load(stored)  # still whole
    assert store.add(stored, "copy").is_dir()  # under another name it is an ordinary copy


@pytest.mark.parametrize("how", ["read-only folder", "below a file"])
def test_an_unwritable_home_is_named(how, run_dir, tmp_path, monkeypatch):
    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
    else:
        parent = tmp_path / "a-file"
        parent.write_text("")
    monkeypatch.setenv("NLM_HOME", str(parent / "home"))
    try:
        with pytest.raises(NlmError, match=f"{parent / 'home' / 'models'}: the model store cannot be written "
                                           r"\(.*\); set NLM_HOME to a writable folder"):
            store.add(run_dir, "bard")
    finally:
        if parent.is_dir():
            parent.chmod(0o700)
    assert store.entries() == [] and (run_dir / "model.safetensors").is_file()


def test_resolve_prefers_a_path_then_a_name(run_dir, tmp_path, store_home, monkeypatch):
    with pytest.raises(NlmError, match=r"^bard: no such checkpoint directory, and no stored model of that name "
                                       r"\(nlm models list shows them\)$"):
        store.resolve("bard")
    assert not store_home.exists()  # resolve only reads
    stored = store.add(run_dir, "bard")
    monkeypatch.chdir(tmp_path)
    assert store.resolve("bard") == stored
    assert store.resolve(Path("bard")) == stored
    assert store.resolve(run_dir) == run_dir and store.resolve(str(run_dir)) == run_dir
    (tmp_path / "bard").mkdir()  # a folder of the same name, here: the path wins
    assert store.resolve("bard") == Path("bard")
    with pytest.raises(NlmError, match="no such checkpoint directory"):
        store.resolve("")  # not the current folder


def test_kinds_scores_and_broken_entries(tmp_path, store_home):
    models = store_home / "models"
    fake_checkpoint(models / "onnx", {"export": {"format": "onnx"}, "data": {"corpus": "ptb"}})
    fake_checkpoint(models / "small", {"quantization": {"scheme": "int8"}, "info": {"valid_perplexity": 123.456}})
    fake_checkpoint(models / "plain", {"data": {"corpus": "wikitext2"}, "info": {"step": 3}})
    fake_checkpoint(models / "zz-broken", {})
    (models / "zz-broken" / "config.json").write_text("{not json")
    fake_checkpoint(models / "list", {})
    (models / "list" / "config.json").write_text("[1, 2]")
    fake_checkpoint(models / ".bard.tmp-1", {})  # a copy under way: not a model
    (models / "stray-file").write_text("")
    got = {e["name"]: (e["kind"], e["corpus"], e["validation"]) for e in store.entries()}
    assert list(got) == ["list", "onnx", "plain", "small", "zz-broken"]
    assert got["onnx"] == ("exported (onnx)", "ptb", "-")
    assert got["small"] == ("quantized (int8)", "-", "ppl 123.46")
    assert got["plain"] == ("LM", "wikitext2", "-")
    assert got["list"][0] == "broken: config.json is not a JSON object"
    assert got["zz-broken"][0].startswith("broken: config.json not valid JSON")


def test_format_table(tmp_path, store_home):
    models = store_home / "models"
    fake_checkpoint(models / "a", {"data": {"corpus": "ptb"}, "info": {"valid_bpc": 1.23456}}, b"\0" * 1400)
    fake_checkpoint(models / "a-longer-name", {"export": {"format": "onnx"}}, b"\0" * 2_500_000)
    rows = store.entries()
    lines = store.format_table(rows)
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "CORPUS", "VALID", "DATE"]
    assert len(lines) == 3
    for column in ("KIND", "SIZE", "CORPUS", "VALID", "DATE"):  # every column starts where its header does
        start = lines[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines[1:]), column
    assert lines[1].split()[:6] == ["a", "LM", "1.5", "KB", "ptb", "bpc"]
    assert "2.5 MB" in lines[2] and "exported (onnx)" in lines[2]
    assert store.format_table([]) == ["NAME  KIND  SIZE  CORPUS  VALID  DATE"]
    assert [store.human_size(n) for n in (0, 999, 1000, 3_200_000_000)] == ["0 B", "999 B", "1.0 KB", "3.2 GB"]


def test_home(monkeypatch, tmp_path):
    assert store.home() == tmp_path / "home"
    monkeypatch.delenv("NLM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.home() == tmp_path / "xdg" / "neurallm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says to ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert store.home() == tmp_path / "me" / ".cache" / "neurallm"
