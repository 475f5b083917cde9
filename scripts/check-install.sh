#!/usr/bin/env bash
# What a user installs is what runs: in clean virtual environments,
# 1. `pip install .` alone (no extras), at the lowest versions pyproject.toml admits for each
#    dependency but torch (2.13.0, the one build on this disk), runs every verb on a small slice
#    of text (character, byte and BPE models; compression both ways);
# 2. each extra, installed on top of that plain install by itself, imports its modules.
# Run by .ci/run; by hand: bash scripts/check-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pip's notes on absent local indexes

echo "== plain install, lowest dependency versions"
python3 -m venv "$work/plain"
py="$work/plain/bin/python"
quiet "$py" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
# Each lower bound ">=X" of the core dependencies becomes "==X" (torch stays at 2.13.0).
"$py" - "$root/pyproject.toml" > "$work/lowest.txt" <<'EOF'
import re, sys, tomllib
for req in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", req)
    if m and m.group(1) != "torch":
        print(f"{m.group(1)}=={m.group(2)}")
EOF
cat "$work/lowest.txt"
quiet "$py" -m pip install -q "$root" -c "$work/lowest.txt"
"$py" -m pip list 2>/dev/null | grep -i -E "^(torch|numpy|safetensors|tokenizers|tqdm|matplotlib) " || true
if "$py" -c "import matplotlib" 2>/dev/null; then
  echo "matplotlib is installed without the plots extra: the check cannot tell what a plain install lacks" >&2
  exit 1
fi

# A small corpus: the first lines of Tiny Shakespeare where the shared data is, else a few made-up lines.
corpus="$work/corpus"
mkdir -p "$corpus"
src="${NLM_DATA_DIR:-$root/../shared/data}/tinyshakespeare/input.txt"
if [ -f "$src" ]; then
  head -n 400 "$src" > "$corpus/train.txt"
  sed -n 401,460p "$src" > "$corpus/valid.txt"
else
  for i in $(seq 1 200); do echo "First Citizen: we are accounted poor citizens, the patricians good $i."; done \
    > "$corpus/train.txt"
  head -n 30 "$corpus/train.txt" > "$corpus/valid.txt"
fi
cp "$corpus/valid.txt" "$corpus/test.txt"

nlm="$work/plain/bin/nlm"
run="$work/run"
(
  cd "$work"
  "$nlm" train shakespeare-char --out "$run" --max-steps 3 --no-progress --data.corpus="$corpus" \
    --model.hidden_size=16 --model.emb_size=8 --train.batch_size=4 --train.bptt=16 --train.eval_batch_size=2
  test -f "$run/model.safetensors"
  "$nlm" eval "$run" --split test --json
  "$nlm" generate "$run" --prompt "ROMEO:" --max-tokens 40 --seed 1
  "$nlm" score "$run" --text "ROMEO: hi" --json > /dev/null
  # The decoding engine: state files, the speed report, a chat fed from a pipe.
  "$nlm" generate "$run" --prompt "ROMEO:" --max-tokens 10 --save-state "$work/s.safetensors" > /dev/null
  "$nlm" generate "$run" --state "$work/s.safetensors" --max-tokens 10 > /dev/null
  "$nlm" generate "$run" --bench --batch 4 --max-tokens 10 --json
  chat=$(printf 'good citizens\n/stats\n/quit\n' | "$nlm" chat "$run" --max-tokens 20)
  grep -q "tokens behind the state" <<< "$chat"
  # Without the serve extra, nlm serve says what to install.
  if "$nlm" serve "$run" 2> "$work/serve.err"; then exit 1; fi
  grep -q "pip install 'neurallm\[serve\]'" "$work/serve.err"
  "$nlm" data list > /dev/null
  # Quantized and TorchScript / pt2 exports need torch alone; ONNX says which extra it needs.
  "$nlm" quantize "$run" --scheme int8 --out "$work/q8" --tokens 200 --max-increase 100
  "$nlm" generate "$work/q8" --prompt "ROMEO:" --max-tokens 10 > /dev/null
  "$nlm" export "$run" --format torchscript --out "$work/ts" --verify-tokens 100
  "$nlm" eval "$work/ts" --split test --json > /dev/null
  if "$nlm" export "$run" --format onnx --out "$work/onnx" 2> "$work/onnx.err"; then exit 1; fi
  grep -q "pip install 'neurallm\[export\]'" "$work/onnx.err"
  # The model store: a short name wherever a checkpoint path goes.
  NLM_HOME="$work/home" "$nlm" models add "$run" tiny
  NLM_HOME="$work/home" "$nlm" generate tiny --max-tokens 5 > /dev/null
  NLM_HOME="$work/home" "$nlm" models list
  # A tagger (conllu; seqeval for entities) and a classifier, trained, scored and run on slices of the real files.
  data="${NLM_DATA_DIR:-$root/../shared/data}"
  mkdir -p "$work/ud" "$work/ner" "$work/sst"
  if [ -d "$data/ud-english-ewt" ] && [ -d "$data/conll2003" ] && [ -d "$data/sst2" ]; then
    awk 'BEGIN{RS=""; ORS="\n\n"} NR<=30' "$data/ud-english-ewt/en_ewt-ud-dev.conllu" > "$work/ud/train.conllu"
    awk 'BEGIN{RS=""; ORS="\n\n"} NR<=40' "$data/conll2003/valid.txt" > "$work/ner/train.txt"
    head -n 200 "$data/sst2/train.tsv" > "$work/sst/train.tsv"
    head -n 50 "$data/sst2/dev.tsv" > "$work/sst/dev.tsv"
  else
    printf '1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_\n2\tdog\tdog\tNOUN\t_\t_\t0\troot\t_\t_\n\n' > "$work/ud/train.conllu"
    printf 'Peter NNP B-NP B-PER\nwent VBD B-VP O\nto TO B-PP O\nParis NNP B-NP B-LOC\n\n' > "$work/ner/train.txt"
    printf 'sentence\tlabel\ngood film\t1\nbad film\t0\n' > "$work/sst/train.tsv"
    cp "$work/sst/train.tsv" "$work/sst/dev.tsv"
  fi
  cp "$work/ud/train.conllu" "$work/ud/dev.conllu"
  cp "$work/ner/train.txt" "$work/ner/valid.txt"
  small="--model.hidden_size=16 --model.emb_size=16 --task.char_size=8 --task.char_emb_size=8 --train.batch_size=8"
  "$nlm" tag train ud-ewt-upos --out "$work/pos" --max-steps 3 --no-progress --data.corpus="$work/ud" $small
  "$nlm" tag eval "$work/pos" --file "$work/ud/dev.conllu" --json
  echo "The dog barks ." | "$nlm" tag predict "$work/pos"
  "$nlm" tag train conll2003-ner --out "$work/ner-run" --max-steps 3 --no-progress --data.corpus="$work/ner" $small
  "$nlm" tag eval "$work/ner-run" --file "$work/ner/valid.txt" --json
  "$nlm" classify train sst2 --out "$work/cls" --max-steps 3 --no-progress --data.corpus="$work/sst" $small
  echo "a fine film" | "$nlm" classify predict "$work/cls"
  # The gradient lab without matplotlib: figures and JSON, and a line saying where the plots went.
  lab="$work/lab"
  "$nlm" diagnose gradients "$run" --length 8 --rows 2 --warmup 2 --out "$lab" > "$work/lab.out"
  grep -q "pip install 'neurallm\[plots\]'" "$work/lab.out" && test -f "$lab/gradients.json"
  "$nlm" diagnose gradients --cell gru --data "$corpus" --hidden 8 --length 8 --rows 2 --warmup 2 --out "$lab" --json
  "$nlm" diagnose explode --data "$corpus" --hidden 8 --steps 3 --batch-size 2 --bptt 8 --out "$lab" > /dev/null
  "$nlm" diagnose memory --cells rnn,gru --tasks copy,adding --distances 2,3 --params 300 --steps 3 --eval-size 8 \
    --out "$lab" > /dev/null
  "$nlm" diagnose gates "$run" --tokens 200 --chars 40 --out "$lab" > /dev/null && test -f "$lab/gates.html"
  "$nlm" diagnose dependency "$run" --split valid --tokens 300 --per-bin 5 --out "$lab" > /dev/null
  "$nlm" diagnose depth --data "$corpus" --layers 2 --connections none,residual --hidden 8 --length 5 --rows 2 \
    --warmup 2 --out "$lab" > /dev/null
  "$nlm" compare shakespeare-char --steps 2 --out "$lab/compare" --no-progress --data.corpus="$corpus" \
    --model.hidden_size=8 --model.emb_size=8 --train.batch_size=4 --train.bptt=16 --train.eval_batch_size=2 > /dev/null
  test -f "$lab/compare/report.md"
  # Byte-level BPE (tokenizers' DecodeStream streams its output) and the progress bar (tqdm).
  "$nlm" train ptb-small --out "$work/bpe" --max-steps 2 --no-progress --data.corpus="$corpus" \
    --data.tokenizer=bpe --data.bpe_vocab_size=300 --model.hidden_size=16 --model.emb_size=16 \
    --train.batch_size=4 --train.bptt=16 --train.eval_batch_size=2
  "$nlm" generate "$work/bpe" --prompt "First" --max-tokens 20 --seed 1
  # Compression, online and from a byte-level prior, each round trip compared; dynamic evaluation.
  "$nlm" compress "$corpus/valid.txt" "$work/v.nlmz" --hidden 8 --no-progress --json
  "$nlm" decompress "$work/v.nlmz" "$work/v.out" --no-progress > /dev/null
  cmp "$corpus/valid.txt" "$work/v.out"
  "$nlm" train shakespeare-char --out "$work/bytes" --max-steps 2 --no-progress --data.corpus="$corpus" \
    --data.tokenizer=byte --model.hidden_size=16 --model.emb_size=8 --train.batch_size=4 --train.bptt=16 \
    --train.eval_batch_size=2
  "$nlm" compress "$corpus/valid.txt" "$work/p.nlmz" --model "$work/bytes" --no-progress > /dev/null
  "$nlm" decompress "$work/p.nlmz" "$work/p.out" --model "$work/bytes" --no-progress > /dev/null
  cmp "$corpus/valid.txt" "$work/p.out"
  "$nlm" eval "$run" --split test --dynamic --dynamic.lr 0.1 --json > /dev/null
  "$py" -c "
import io
from neurallm.progress import RunProgress
class Terminal(io.StringIO):
    def isatty(self): return True
bar = RunProgress(100, 60.0, 0, 0.0, stream=Terminal())
bar.update(10, 30.0, 1, 2.0, 1000.0)
bar.close()
assert bar.mode == 'time' and '30/60 s' in bar.stream.getvalue()
"
)

echo "== each extra on its own"
cd "$work"  # import what is installed, not the source tree
extras=$("$py" -c "import sys, tomllib; print(' '.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']))" \
  "$root/pyproject.toml")
for extra in $extras; do
  cp -a "$work/plain" "$work/extra-$extra"  # the plain install, then this extra alone
  xpy="$work/extra-$extra/bin/python"
  quiet "$xpy" -m pip install -q "$root[$extra]"
  # Import every top-level module of every distribution the extra names.
  "$xpy" - "$root/pyproject.toml" "$extra" <<'EOF'
import importlib, importlib.metadata as md, re, sys, tomllib
extra = sys.argv[2]
reqs = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"][extra]
modules = {dist.lower().replace("_", "-"): [] for dist in (re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs)}
for module, dists in md.packages_distributions().items():
    for dist in dists:
        if dist.lower().replace("_", "-") in modules and not module.startswith("_"):
            modules[dist.lower().replace("_", "-")].append(module)
for dist, names in modules.items():
    if not names:
        sys.exit(f"extra {extra}: {dist} installed no importable module")
    for name in names:
        importlib.import_module(name)
print(f"extra {extra}: imported {', '.join(sorted(n for ns in modules.values() for n in ns))}")
EOF
  if [ "$extra" = plots ]; then  # and what the extra is for works
    "$xpy" -c "import sys; from neurallm.plots import training_curves; assert training_curves(*sys.argv[1:])" \
      "$run/metrics.jsonl" "$work/curves.png"
  fi
  if [ "$extra" = export ]; then  # an ONNX export, verified, then run by onnxruntime
    "$xpy" -m neurallm export "$run" --format onnx --out "$work/onnx" --verify-tokens 100
    "$xpy" -m neurallm generate "$work/onnx" --prompt "ROMEO:" --max-tokens 10 > /dev/null
  fi
  if [ "$extra" = serve ]; then
    port=$("$xpy" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    "$xpy" -m neurallm serve "$run" --port "$port" & server=$!  # (a copied venv's scripts point at the original)
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.2; done
    reply=$(curl -sf "http://127.0.0.1:$port/v1/chat/completions" \
      -d '{"model": "run", "messages": [{"role": "user", "content": "good citizens"}], "max_tokens": 5}')
    page=$(curl -sf "http://127.0.0.1:$port/")
    grep -q '"chat.completion"' <<< "$reply" && grep -q "<html" <<< "$page"
    kill -TERM "$server"; wait "$server" || true
  fi
  rm -rf "$work/extra-$extra"
done
echo "install check passed"
