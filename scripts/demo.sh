#!/usr/bin/env bash
# The main job: train a small (2 x 256) character-level LSTM on Tiny Shakespeare for two minutes,
# report validation bits per character, and print a generated sample.
source "$(dirname "$0")/setup.sh"
rm -rf runs/demo-shakespeare
nlm train shakespeare-char --out runs/demo-shakespeare --max-minutes 2 --model.hidden_size=256
nlm eval runs/demo-shakespeare --split valid --batch-size 16
nlm generate runs/demo-shakespeare --prompt "ROMEO:" --max-tokens 400 --temperature 0.8 --seed 1
