"""The corpus registry: where each data set comes from, how it is checked, where it is cached.

Lookup order for a corpus file:
1. ``$NLM_DATA_DIR/<corpus>/<file>`` when NLM_DATA_DIR is set (a folder laid out like
   ``shared/data``; tests and CI use this, and it is never downloaded into);
2. the cache, ``$NLM_CACHE_DIR/data/<corpus>/<file>`` (default ``~/.cache/neurallm``);
3. a download of the canonical archive into the cache, checked against sha256.
Every file is checked against its sha256 once per process.
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


REGISTRY: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
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


def _missing_message(corpus: Corpus, missing: list[str], reason: str) -> str:
    where = local_dir() / corpus.name if local_dir() else cache_dir() / corpus.name
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
            missing = [f for f in corpus.files if not (target / f).is_file()]
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


def split_text(name: str, split: str) -> str:
    """The text of one split: of a registered corpus, or ``DIR/SPLIT.txt`` when ``name`` is a folder."""
    if name not in REGISTRY and Path(name).is_dir():
        return read_text(Path(name) / f"{split}.txt")
    corpus = get(name)
    if split not in corpus.splits:
        raise NlmError(f"corpus {name} has no split {split!r} (splits: {', '.join(corpus.splits)})")
    text = read_text(path(name, corpus.splits[split]))
    if split in corpus.split_fractions:
        start, end = corpus.split_fractions[split]
        text = text[int(len(text) * start): int(len(text) * end)]
    return text


def info(name: str) -> dict:
    corpus = get(name)
    files = {}
    for filename, digest in corpus.files.items():
        present = next((str(p) for p in candidates(corpus, filename) if p.is_file()), None)
        files[filename] = {"sha256": digest, "found": present, "looked_in": [str(p) for p in candidates(corpus, filename)]}
    return {"name": corpus.name, "description": corpus.description, "level": corpus.level,
            "splits": list(corpus.splits), "sources": [s.url for s in corpus.sources], "files": files}

