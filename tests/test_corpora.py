"""The corpus registry: local folder, checksums, download into the cache, clear errors."""

import hashlib
import io
import tarfile
import zipfile

import pytest

from neurallm.data import corpora
from neurallm.errors import NlmError

from conftest import need


def test_registry_knows_the_language_modelling_sets():
    assert {"ptb", "wikitext-2", "tinyshakespeare"} <= set(corpora.REGISTRY)
    for corpus in corpora.REGISTRY.values():
        assert all(len(d) == 64 for d in corpus.files.values())
        assert all(s.url.startswith("http") for s in corpus.sources)
        assert set(corpus.splits.values()) <= set(corpus.files)


def test_local_folder_is_found_and_checked():
    need("ptb")
    path = corpora.path("ptb", "ptb.valid.txt")
    assert path.is_file() and corpora.sha256(path) == corpora.REGISTRY["ptb"].files["ptb.valid.txt"]
    text = corpora.split_text("ptb", "valid")
    assert len(text.split()) == 70390  # the published count


def test_shakespeare_is_split_90_10():
    need("tinyshakespeare")
    train, valid = corpora.split_text("tinyshakespeare", "train"), corpora.split_text("tinyshakespeare", "valid")
    assert len(train) == int(1115394 * 0.9) and len(train) + len(valid) == 1115394
    with pytest.raises(NlmError, match="no split 'test'"):
        corpora.split_text("tinyshakespeare", "test")


def test_missing_files_offline_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("NLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NLM_OFFLINE", "1")
    with pytest.raises(NlmError) as err:
        corpora.split_text("wikitext-2", "train")
    message = str(err.value)
    assert "missing train.txt" in message and str(tmp_path / "wikitext-2") in message
    assert "wikitext-2-v1.zip" in message


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("not shakespeare\n")
    monkeypatch.setenv("NLM_DATA_DIR", str(tmp_path))
    with pytest.raises(NlmError, match="sha256 is .* expected 86c4e6aa"):
        corpora.split_text("tinyshakespeare", "train")


@pytest.mark.parametrize("archive", ["tgz", "zip", "plain"])
def test_download_extracts_checks_and_caches(tmp_path, monkeypatch, archive):
    files = {"train.txt": b"a b c\n", "valid.txt": b"c b a\n"}
    payload = io.BytesIO()
    if archive == "tgz":
        with tarfile.open(fileobj=payload, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"pack/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    elif archive == "zip":
        with zipfile.ZipFile(payload, "w") as z:
            for name, data in files.items():
                z.writestr(f"pack/{name}", data)
    source_file = tmp_path / ("pack." + archive if archive != "plain" else "train.txt")
    source_file.write_bytes(payload.getvalue() if archive != "plain" else files["train.txt"])
    if archive == "plain":
        files = {"train.txt": files["train.txt"]}
    members = {} if archive == "plain" else {f"pack/{n}": n for n in files}
    corpus = corpora.Corpus("toy", "a toy corpus", {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
                            {"train": "train.txt"}, (corpora.Source(source_file.as_uri(), members),))
    monkeypatch.setitem(corpora.REGISTRY, "toy", corpus)
    monkeypatch.setenv("NLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NLM_DATA_DIR", raising=False)
    monkeypatch.delenv("NLM_OFFLINE", raising=False)
    assert corpora.split_text("toy", "train") == "a b c\n"
    for name, data in files.items():
        assert (tmp_path / "cache" / "data" / "toy" / name).read_bytes() == data
    assert not [p for p in (tmp_path / "cache" / "data" / "toy").iterdir() if p.name.startswith(".")]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    source_file = tmp_path / "train.txt"
    source_file.write_bytes(b"tampered\n")
    corpus = corpora.Corpus("toy2", "toy", {"train.txt": "0" * 64}, {"train": "train.txt"},
                            (corpora.Source(source_file.as_uri()),))
    monkeypatch.setitem(corpora.REGISTRY, "toy2", corpus)
    monkeypatch.setenv("NLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NLM_DATA_DIR", raising=False)
    monkeypatch.delenv("NLM_OFFLINE", raising=False)
    with pytest.raises(NlmError, match="sha256"):
        corpora.split_text("toy2", "train")
    assert list((tmp_path / "cache" / "data" / "toy2").iterdir()) == []


def test_bad_text_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(NlmError, match=r"latin1.txt: not UTF-8 text \(byte 12, line 2"):
        corpora.read_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(NlmError, match="empty.txt: empty corpus"):
        corpora.read_text(empty)
    with pytest.raises(NlmError, match="missing.txt: no such file"):
        corpora.read_text(tmp_path / "missing.txt")


def test_folder_corpus(word_corpus):
    assert corpora.split_text(str(word_corpus), "valid").count("\n") == 40
    with pytest.raises(NlmError, match="unknown corpus 'nowhere'"):
        corpora.split_text("nowhere", "train")


# The labelled sets: token tagging (UD EWT, CoNLL-2003) and sentence classification (SST-2, SST-5)

LABELLED = {"ud-english-ewt": "tagging", "conll2003": "tagging", "sst2": "classification", "sst5": "classification"}


def test_labelled_corpora_have_a_task_and_a_source_or_recipe_for_every_file():
    assert {corpus.task for corpus in corpora.REGISTRY.values()} == set(corpora.TASKS)
    for name, task in LABELLED.items():
        corpus = corpora.REGISTRY[name]
        assert corpus.task == task and corpora.info(name)["task"] == task
        assert set(corpus.splits) == {"train", "valid", "test"}
        # A source without members is saved under its URL's file name.
        downloaded = {local for s in corpus.sources for local in (s.members.values() or corpora._extract(s, b""))}
        assert downloaded | set(corpus.derived) == set(corpus.files) and not downloaded & set(corpus.derived)
    ewt_train = corpora.REGISTRY["ud-english-ewt"].sources[0]
    assert corpora._extract(ewt_train, b"x") == {"en_ewt-ud-train.conllu": b"x"}
    assert "research" in corpora.REGISTRY["conll2003"].description


@pytest.mark.parametrize("name", sorted(LABELLED))
def test_split_path_checks_each_split_file(name):
    corpus = corpora.REGISTRY[name]
    for split, filename in corpus.splits.items():
        need(name, filename)
        path = corpora.split_path(name, split)
        assert path.name == filename and corpora.sha256(path) == corpus.files[filename]
    assert corpora.split_path(name, "dev") == corpora.split_path(name, "valid")  # UD, GLUE and SST say dev
    with pytest.raises(NlmError, match=rf"corpus {name} has no split 'tune'"):
        corpora.split_path(name, "tune")


def test_split_names():
    assert corpora.split_file(corpora.get("sst2"), "dev") == "dev.tsv"
    assert corpora.split_file(corpora.get("sst2"), "test") == "test_labeled.tsv"  # test.tsv has no labels
    assert corpora.split_file(corpora.get("ud-english-ewt"), "valid") == "en_ewt-ud-dev.conllu"
    assert corpora.split_file(corpora.get("ptb"), "dev") == "ptb.valid.txt"


def test_split_text_is_for_language_model_corpora():
    with pytest.raises(NlmError, match="corpus conll2003 holds tagging data, not running text"):
        corpora.split_text("conll2003", "train")


def test_missing_labelled_files_say_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv("NLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NLM_OFFLINE", "1")
    with pytest.raises(NlmError) as err:
        corpora.split_path("conll2003", "dev")
    assert "missing valid.txt" in str(err.value) and "Franck-Dernoncourt/NeuroNER" in str(err.value)


def test_derived_file_is_never_downloaded_and_says_how_it_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("NLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NLM_OFFLINE", raising=False)
    monkeypatch.setattr(corpora.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(NlmError) as err:
        corpora.split_path("sst2", "test")
    message = str(err.value)
    assert "missing test_labeled.tsv; it has no download" in message and str(tmp_path / "sst2") in message
    assert "GLUE publishes no SST-2 test labels" in message and "sst5/test.txt" in message


def test_data_list_shows_each_task(capsys):
    from neurallm.cli import main

    assert main(["data", "list"]) == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()}
    assert rows == {name: corpus.task for name, corpus in corpora.REGISTRY.items()}
