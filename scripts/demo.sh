#!/usr/bin/env bash
# The main job: train a one-layer character LSTM on Tiny Shakespeare for a fixed 1,200 steps,
# report its validation loss, and print a generated sample. The same work on every machine:
# under three minutes on two CPU cores (benchmarks/results/demo.json).
source "$(dirname "$0")/setup.sh"
rm -rf runs/demo-shakespeare
echo "Training a 1 x 512 character LSTM for 1,200 steps (under 3 minutes on 2 CPU cores, longer on a slower machine)."
nlm train shakespeare-char-small --out runs/demo-shakespeare
nlm eval runs/demo-shakespeare --split valid
nlm generate runs/demo-shakespeare --prompt "ROMEO:" --max-tokens 400 --temperature 0.8 --seed 1
