"""The corpus registry: where each data set comes from, how it is checked, where it is cached.

Lookup order for a corpus file:
1. ``$NLM_DATA_DIR/<corpus>/<file>`` when NLM_DATA_DIR is set (a folder laid out like
   ``shared/data``; tests and CI use this, and it is never downloaded into);
2. the cache, ``$NLM_CACHE_DIR/data/<corpus>/<file>`` (default ``~/.cache/neurallm``);
3. a download of the canonical archive into the cache, checked against sha256.
Every file is checked against its sha256 once per process.

A corpus serves one task: running text for language models (``lm``), token-level tags (``tagging``) or
labelled sentences (``classification``). ``split_text`` gives an LM corpus's text; ``split_path`` gives
the checked file of any corpus's split, for the readers in conll.py and sentiment.py.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from neurallm.errors import NlmError


@dataclass(frozen=True)
class Source:
    """One download: a URL, and for archives which member becomes which local file."""

    url: str
    members: dict[str, str] = field(default_factory=dict)  # archive member -> local file name


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    files: dict[str, str]  # local file name -> sha256
    splits: dict[str, str]  # split -> local file name
    sources: tuple[Source, ...]
    # A corpus with one file split by fraction (char-rnn and nanoGPT split Tiny Shakespeare 90/10).
    split_fractions: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: str = "word"  # the natural tokenization: word or char
    task: str = "lm"  # lm (running text), tagging (a tag per token) or classification (a label per sentence)
    # Files no source downloads (they are derived): local file name -> how to make or where to get it.
    derived: dict[str, str] = field(default_factory=dict)


TASKS = ("lm", "tagging", "classification")


REGISTRY: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
    if corpus.task not in TASKS:
        raise ValueError(f"corpus {corpus.name}: task {corpus.task!r}, expected one of {', '.join(TASKS)}")
    REGISTRY[corpus.name] = corpus
    return corpus


register(Corpus(
    name="ptb",
    description="Penn Treebank, Mikolov's language-modelling version (10k vocabulary)",
    files={
        "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    },
    splits={"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
    sources=(Source("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz", {
        f"simple-examples/data/ptb.{s}.txt": f"ptb.{s}.txt" for s in ("train", "valid", "test")}),),
))

register(Corpus(
    name="wikitext-2",
    description="WikiText-2 (tokenized, v1; 33,278-word vocabulary)",
    files={
        "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
    splits={"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
    sources=(Source("https://wikitext.smerity.com/wikitext-2-v1.zip", {
        f"wikitext-2/wiki.{s}.tokens": f"{s}.txt" for s in ("train", "valid", "test")}),),
))

register(Corpus(
    name="tinyshakespeare",
    description="Tiny Shakespeare (char-rnn); first 90% train, last 10% valid, as nanoGPT splits it",
    files={"input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
    splits={"train": "input.txt", "valid": "input.txt"},
    split_fractions={"train": (0.0, 0.9), "valid": (0.9, 1.0)},
    sources=(Source("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),),
    level="char",
))


_EWT = "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/r2.16"
register(Corpus(
    name="ud-english-ewt",
    description="Universal Dependencies English EWT v2.16 (CoNLL-U; UPOS/XPOS tagging; CC BY-SA 4.0)",
    files={
        "en_ewt-ud-train.conllu": "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b",
        "en_ewt-ud-dev.conllu": "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6",
        "en_ewt-ud-test.conllu": "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd",
    },
    splits={"train": "en_ewt-ud-train.conllu", "valid": "en_ewt-ud-dev.conllu", "test": "en_ewt-ud-test.conllu"},
    # One plain file per source: each is saved under its URL's file name.
    sources=tuple(Source(f"{_EWT}/en_ewt-ud-{s}.conllu") for s in ("train", "dev", "test")),
    task="tagging",
))

_CONLL = ("https://raw.githubusercontent.com/Franck-Dernoncourt/NeuroNER/"
          "3817feaf290c1f6e03ae23ea964e68c88d0e7a88/neuroner/data/conll2003/en")
register(Corpus(
    name="conll2003",
    description="CoNLL-2003 English NER, IOB2 tags (Reuters text: research use only, do not ship it in a product)",
    files={
        "train.txt": "213953b5522fb7924802d883e50f027b2c6ffb5d4d0e63368ed82909f9b60423",
        "valid.txt": "c02eb19809eafb83998326a0481942eb37d96f31826ae387cfe8773699969f5b",
        "test.txt": "dc4ac7f3d6d01a6bec59261814561da3b287b6b493b97d1f69c580b52ec1831b",
    },
    splits={"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
    sources=tuple(Source(f"{_CONLL}/{s}.txt") for s in ("train", "valid", "test")),
    task="tagging",
))

register(Corpus(
    name="sst2",
    description="Stanford Sentiment Treebank, binary (GLUE SST-2 TSV; test labels matched from the SST trees)",
    files={
        "train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
        "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        "test.tsv": "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
        "test_labeled.tsv": "67e63a7551f3d7e951dc59831a6073f79f3743027148dca221c6dee087b5339a",
    },
    splits={"train": "train.tsv", "valid": "dev.tsv", "test": "test_labeled.tsv"},
    sources=(Source("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip", {
        f"SST-2/{s}.tsv": f"{s}.tsv" for s in ("train", "dev", "test")}),),
    task="classification",
    # GLUE withholds the test labels, so this file is made, not downloaded.
    derived={"test_labeled.tsv": (
        "GLUE publishes no SST-2 test labels; test_labeled.tsv (header index<TAB>sentence<TAB>label) is made by "
        "matching each sentence of test.tsv to its tree in the SST test trees (sst5/test.txt) and taking the root "
        "label, 0-1 -> 0 and 3-4 -> 1 (7 sentences that GLUE spells differently were matched by hand). "
        "The project's shared data folder (shared/data/sst2/) holds a copy; its README says how it was checked")},
))

register(Corpus(
    name="sst5",
    description="Stanford Sentiment Treebank, PTB-format trees with 5 sentiment labels (SST-5)",
    files={
        "train.txt": "e2f3f41b0b1e6d4dddc0effe3bfc2d27ed8928079aa9a03d652311614fc5feb7",
        "dev.txt": "0e9336aed6e4730e19f58d00a77b3f0297efdb755f7b5e598c98a05e3f97ea40",
        "test.txt": "6e54806dee95cf80cd918e7dfb3f6770f6df24bf826f289a4d1f709e1c8f6761",
    },
    splits={"train": "train.txt", "valid": "dev.txt", "test": "test.txt"},
    sources=(Source("https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip", {
        f"trees/{s}.txt": f"{s}.txt" for s in ("train", "dev", "test")}),),
    task="classification",
))


def get(name: str) -> Corpus:
    if name not in REGISTRY:
        raise NlmError(f"unknown corpus {name!r} (known: {', '.join(sorted(REGISTRY))}; "
                       "or a folder holding train.txt, valid.txt and test.txt)")
    return REGISTRY[name]


def cache_dir() -> Path:
    return Path(os.environ.get("NLM_CACHE_DIR", Path.home() / ".cache" / "neurallm")) / "data"


def local_dir() -> Path | None:
    value = os.environ.get("NLM_DATA_DIR")
    return Path(value) if value else None


def candidates(corpus: Corpus, filename: str) -> list[Path]:
    """Where a file is looked for, in order."""
    found = [cache_dir() / corpus.name / filename]
    if local_dir() is not None:
        found.insert(0, local_dir() / corpus.name / filename)
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_verified: set[Path] = set()


def _verify(path: Path, expected: str) -> None:
    if path in _verified:
        return
    actual = sha256(path)
    if actual != expected:
        raise NlmError(f"{path}: sha256 is {actual}, expected {expected} (a different or damaged file)")
    _verified.add(path)


def _home(corpus: Corpus) -> Path:
    """Where a missing file should be put."""
    return local_dir() / corpus.name if local_dir() else cache_dir() / corpus.name


def _missing_message(corpus: Corpus, missing: list[str], reason: str) -> str:
    where = _home(corpus)
    return (f"corpus {corpus.name}: missing {', '.join(missing)}; {reason}. Put the files in {where}/ "
            f"(or set NLM_DATA_DIR to a folder holding {corpus.name}/), "
            f"from {' or '.join(s.url for s in corpus.sources)}")


def download(corpus: Corpus, progress: bool = True) -> None:
    """Fetch the canonical archive, extract the files, check sha256, then move them into the cache."""
    target = cache_dir() / corpus.name
    target.mkdir(parents=True, exist_ok=True)
    for source in corpus.sources:
        if progress:
            print(f"downloading {source.url}", flush=True)
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response:
                payload = response.read()
        except (OSError, http.client.HTTPException) as e:
            missing = [f for f in corpus.files if not (target / f).is_file() and f not in corpus.derived]
            raise NlmError(_missing_message(corpus, missing, f"download failed ({e})")) from None
        try:
            files = _extract(source, payload)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
            raise NlmError(f"{source.url}: not the expected archive ({e})") from None
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            for local, data in files.items():
                staged = Path(tmp) / local
                staged.write_bytes(data)
                _verify(staged, corpus.files[local])
                _verified.discard(staged)
                os.replace(staged, target / local)  # atomic: a killed download leaves no half file


def _extract(source: Source, payload: bytes) -> dict[str, bytes]:
    if not source.members:
        return {Path(source.url).name: payload}
    wanted = {_norm(member): local for member, local in source.members.items()}
    out = {}
    if source.url.endswith((".tgz", ".tar.gz")):
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar.getmembers():
                if _norm(member.name) in wanted and member.isfile():
                    out[wanted[_norm(member.name)]] = tar.extractfile(member).read()
    else:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            for name in archive.namelist():
                if _norm(name) in wanted:
                    out[wanted[_norm(name)]] = archive.read(name)
    missing = sorted(set(wanted.values()) - set(out))
    if missing:
        raise NlmError(f"{source.url}: archive lacks {', '.join(missing)}")
    return out


def _norm(member: str) -> str:
    return member[2:] if member.startswith("./") else member


def path(name: str, filename: str, fetch: bool = True) -> Path:
    """The checked local path of one corpus file, downloading the corpus once if needed."""
    corpus = get(name)
    for candidate in candidates(corpus, filename):
        if candidate.is_file():
            _verify(candidate, corpus.files[filename])
            return candidate
    if filename in corpus.derived:  # no download would bring it
        raise NlmError(f"corpus {corpus.name}: missing {filename}; it has no download. {corpus.derived[filename]}. "
                       f"Put it in {_home(corpus)}/ (or set NLM_DATA_DIR to a folder holding {corpus.name}/)")
    if not fetch or os.environ.get("NLM_OFFLINE"):
        raise NlmError(_missing_message(corpus, [filename], "offline"))
    download(corpus)
    found = cache_dir() / corpus.name / filename
    _verify(found, corpus.files[filename])
    return found


def read_text(file: Path | str) -> str:
    """UTF-8 text of a file; a clear error for a missing, empty or non-UTF-8 file."""
    file = Path(file)
    if not file.is_file():
        raise NlmError(f"{file}: no such file")
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise NlmError(f"{file}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise NlmError(f"{file}: not UTF-8 text (byte {e.start}, line {line}: {raw[e.start:e.start + 1]!r})") from None
    if not text.strip():
        raise NlmError(f"{file}: empty corpus (no text)")
    return text


def split_file(corpus: Corpus, split: str) -> str:
    """The local file name of a split; ``dev`` names the ``valid`` split, as UD, GLUE and SST call it."""
    if split == "dev" and "dev" not in corpus.splits:
        split = "valid"
    if split not in corpus.splits:
        raise NlmError(f"corpus {corpus.name} has no split {split!r} (splits: {', '.join(corpus.splits)})")
    return corpus.splits[split]


def split_path(name: str, split: str) -> Path:
    """The checked local path of a registered corpus's split file (any task), downloading it if needed.

    A split cut from one file by fractions (Tiny Shakespeare) gives the whole file; ``split_text`` cuts it.
    """
    return path(name, split_file(get(name), split))


def split_text(name: str, split: str) -> str:
    """The text of one split: of a registered LM corpus, or ``DIR/SPLIT.txt`` when ``name`` is a folder."""
    if name not in REGISTRY and Path(name).is_dir():
        return read_text(Path(name) / f"{split}.txt")
    corpus = get(name)
    if corpus.task != "lm":  # tags or labels would be read as words
        raise NlmError(f"corpus {name} holds {corpus.task} data, not running text for a language model "
                       f"(its files are read with split_path and the {corpus.task} readers)")
    text = read_text(path(name, split_file(corpus, split)))
    if split in corpus.split_fractions:
        start, end = corpus.split_fractions[split]
        text = text[int(len(text) * start): int(len(text) * end)]
    return text


def text_of(data, split: str, file: str | None = None) -> str:
    """What a language model with the [data] section ``data`` reads: a split or a file, backwards
    when data.reverse is set (each model reads text in the direction it was trained in)."""
    text = read_text(file) if file else split_text(data.corpus, split)
    return text[::-1] if data.reverse else text


def info(name: str) -> dict:
    corpus = get(name)
    files = {}
    for filename, digest in corpus.files.items():
        present = next((str(p) for p in candidates(corpus, filename) if p.is_file()), None)
        files[filename] = {"sha256": digest, "found": present, "looked_in": [str(p) for p in candidates(corpus, filename)]}
    for filename, how in corpus.derived.items():
        files[filename]["derived"] = how
    return {"name": corpus.name, "description": corpus.description, "task": corpus.task, "level": corpus.level,
            "splits": list(corpus.splits), "sources": [s.url for s in corpus.sources], "files": files}

