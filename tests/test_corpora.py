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
