"""The gradient lab: probes that measure why gated cells beat vanilla RNNs.

gradients (flow.py)   ‖∂J(t)/∂h(k)‖ against the distance t - k, per layer; singular values of W_hh
depth (flow.py)       the same measure across the layers of deep stacks and their connections
explode (explode.py)  training with and without clipping, a scaled-up recurrent init
memory (memory.py)    synthetic recall and adding tasks at growing delays, RNN vs LSTM vs GRU
dependency (dependency.py)  how much a trained LM raises a word it saw d tokens earlier
gates (gates.py)      gate saturation and per-character activity of chosen units
compare (compare.py)  the three cells trained on one recipe under one budget, a Markdown report

Each probe is ``command(args) -> (result, lines)``: the result is what ``--json`` prints and
what it writes beside its plots; the lines are what a person reads. Diagnostics sit beside the
training loop, never inside it (they call it, or run their own small loops).
"""
