"""The ``nlm`` command: a table of verbs, each importing its module only when it runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from neurallm.compress import MAX_SEGMENTS
from neurallm.errors import NlmError


def _finite(value):
    """JSON has no NaN or Infinity: such a number (a figure not measured) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    print(json.dumps(_finite(result), allow_nan=False) if as_json else "\n".join(lines), flush=True)


def cmd_train(args, overrides: list[str]) -> int:
    from neurallm import config
    from neurallm.train import train

    extra = []
    if args.max_steps is not None:
        extra.append(f"--train.max_steps={args.max_steps}")
    if args.max_minutes is not None:
        extra.append(f"--train.max_minutes={args.max_minutes}")
    if args.device is not None:
        extra.append(f"--train.device={args.device}")
    recipe = config.load_recipe(args.recipe, overrides + extra)
    if recipe.task.kind != "lm":
        verb = "tag" if recipe.task.kind == "tag" else "classify"
        raise NlmError(f"recipe {args.recipe} trains a {'tagger' if verb == 'tag' else 'classifier'} "
                       f"(task.kind = {recipe.task.kind}); use nlm {verb} train {args.recipe}")
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    if args.save_as:
        from neurallm import store

        store.check_name(args.save_as)
        if (store.models_dir() / args.save_as).exists():
            raise NlmError(f"--save-as {args.save_as}: a stored model of that name exists already "
                           f"(nlm models remove {args.save_as}, or pick another name)")
    result = train(recipe, out, resume=args.resume, show_progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, one summary: rank 0's
    if args.save_as:
        from neurallm import store

        result["saved_as"] = str(store.add(result["checkpoint"], args.save_as))
    metric = (f"valid bpc {result['valid_bpc']:.4f} (loss {result['valid_loss']:.4f} nats/char)"
              if "valid_bpc" in result else f"valid perplexity {result['valid_perplexity']:.2f}")
    _emit(result, args.json, [
        f"trained {result['steps']} steps in {result['seconds']:.0f} s ({result['tokens_per_s']:.0f} tokens/s); "
        f"train loss {result['train_loss']:.4f}; {metric}",
        f"best checkpoint: {result['checkpoint']}" +
        (f"  (curves: {out / 'curves.png'})" if (out / "curves.png").is_file() else "") +
        (f"; stored as {args.save_as}" if args.save_as else "")])
    return 0


def cmd_task(args, overrides: list[str]) -> int:
    """nlm tag ... and nlm classify ...: taggers and classifiers."""
    from neurallm.tasks import commands

    kind = args.verb
    if args.action == "predict":
        return commands.predict(kind, args)
    if args.action == "eval":
        result = commands.evaluate(kind, args)
        lines = [f"{result['file']}: accuracy {100 * result['accuracy']:.2f}% over "
                 f"{result.get('words', result['sentences'])} {'words' if 'words' in result else 'sentences'}"]
        if "f1" in result:
            lines.append(f"entities: precision {100 * result['precision']:.2f}, recall {100 * result['recall']:.2f}, "
                         f"F1 {100 * result['f1']:.2f}")
            lines += [f"  {t:8} F1 {100 * v['f1']:.2f} ({v['support']})" for t, v in result["per_type"].items()]
        _emit(result, args.json, lines)
        return 0
    result = commands.train(kind, args, overrides)
    if os.environ.get("RANK", "0") != "0":
        return 0
    figures = ", ".join(f"{k[6:]} {100 * result[k]:.2f}" for k in ("valid_accuracy", "valid_f1") if k in result)
    _emit(result, args.json, [
        f"trained {result['steps']} steps in {result['seconds']:.0f} s ({result['tokens_per_s']:.0f} words/s); "
        f"train loss {result['train_loss']:.4f}; dev error {100 * result['valid_error']:.2f}% "
        f"(best {100 * result['best_valid_error']:.2f}%){'; ' + figures if figures else ''}",
        f"best checkpoint: {result['checkpoint']}"])
    return 0


def _tokens_of(args, tokenizer, recipe):
    """-> (ids, counts of what the vocabulary could not hold, where the text came from)."""
    from neurallm import config
    from neurallm.data import corpora
    from neurallm.evaluate import encode

    name = args.data or recipe.data.corpus
    data = config.replace(recipe, data={"corpus": name}).data
    text = corpora.text_of(data, args.split, args.file)  # backwards for a backward model
    source = args.file or f"{name}/{args.split}"
    ids, counts = encode(tokenizer, text, source, args.unknown)
    return ids, counts, source


def _vocabulary_note(result: dict) -> str:
    if result.get("skipped"):
        return f"; left out {result['skipped']} characters outside the vocabulary"
    if "unknown" in result:
        return f"; {result['unknown']} tokens are <unk> ({100 * result['unknown_rate']:.2f}%)"
    return ""


def cmd_eval(args, _) -> int:
    from neurallm import checkpoint
    from neurallm.evaluate import evaluate

    if args.dynamic:
        return _eval_dynamic(args)
    model, recipe, tokenizer = checkpoint.open_runner(args.checkpoint, device=args.device)
    ids, counts, source = _tokens_of(args, tokenizer, recipe)
    if not ids:
        raise NlmError(f"{source}: no tokens to evaluate")
    result = {**evaluate(model, tokenizer, ids, batch_size=args.batch_size, bptt=args.bptt), **counts}
    result["source"] = source
    _emit(result, args.json, [f"{source}: {_metric(result)} (nll {result['nll']:.4f} nats/token) over "
                              f"{result['tokens']} tokens, {result['tokens_per_s']:.0f} tokens/s{_vocabulary_note(result)}"])
    return 0


def _metric(result: dict) -> str:
    return f"bpc {result['bpc']:.4f}" if "bpc" in result else f"perplexity {result['perplexity']:.2f}"


def _eval_dynamic(args) -> int:
    """--dynamic: the static score and the adapted one side by side, on the same tokens."""
    from neurallm import checkpoint
    from neurallm.evaluate import dynamic_evaluate, evaluate

    if args.batch_size != 1:
        raise NlmError("--dynamic reads the text as one stream (--batch-size 1)")
    if "quantization" in checkpoint.describe(args.checkpoint)[1]:
        raise NlmError(f"{args.checkpoint}: --dynamic adapts float weights; give the checkpoint it was quantized from")
    model, recipe, tokenizer = checkpoint.load(args.checkpoint, device=args.device)
    ids, counts, source = _tokens_of(args, tokenizer, recipe)
    if not ids:
        raise NlmError(f"{source}: no tokens to evaluate")
    static = evaluate(model, tokenizer, ids, batch_size=1, bptt=args.bptt)
    dynamic = dynamic_evaluate(model, tokenizer, ids, args.dynamic_lr, args.dynamic_decay, args.dynamic_bptt,
                               args.dynamic_method, progress=not args.json and sys.stderr.isatty())
    gain = 1 - dynamic["perplexity"] / static["perplexity"]
    result = {**dynamic, **counts, "source": source, "static": static, "perplexity_reduction": gain}
    _emit(result, args.json, [f"{source}: static {_metric(static)}, dynamic {_metric(dynamic)} "
                              f"({100 * gain:.1f}% lower perplexity; {args.dynamic_method}, lr {args.dynamic_lr}, decay {args.dynamic_decay}, "
                              f"segments of {args.dynamic_bptt}) over {dynamic['tokens']} tokens; "
                              f"{static['seconds']:.1f} s static, {dynamic['seconds']:.1f} s dynamic"])
    return 0


def cmd_compress(args, _) -> int:
    from dataclasses import fields

    from neurallm.compress.files import compress_file
    from neurallm.compress.model import Settings

    chosen = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    if args.model is None and not args.adapt:
        raise NlmError("--no-adapt goes with --model (without a prior, the model has only what it learns)")
    if args.model is not None and (args.hidden or args.layers):
        raise NlmError("--hidden and --layers size a fresh model; with --model its own sizes hold")
    settings = Settings(**chosen)
    result = compress_file(args.input, args.output, settings, args.model, args.force, args.threads,
                           progress=not args.no_progress and sys.stderr.isatty())
    _emit(result, args.json, [_size_line(result, "compressed")])
    return 0


def cmd_decompress(args, _) -> int:
    from neurallm.compress.files import decompress_file

    result = decompress_file(args.input, args.output, args.model, args.force,
                             progress=not args.no_progress and sys.stderr.isatty(), ignore_platform=args.ignore_platform)
    _emit(result, args.json, [_size_line(result, "decompressed")])
    return 0


def _size_line(r: dict, done: str) -> str:
    bpb = f"{r['bits_per_byte']:.3f} bits per byte" if r["bits_per_byte"] is not None else "an empty input"
    speed = f", {r['bytes_per_s'] / 1e3:.1f} kB/s" if r["bytes_per_s"] else ""
    return (f"{r['input']} -> {r['output']}: {done}; original {r['original_bytes']:,} bytes, compressed "
            f"{r['compressed_bytes']:,} bytes, {bpb}, {r['seconds']:.1f} s{speed}")


def cmd_generate(args, _) -> int:
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.bench:
        from neurallm.bench import bench_generate

        if args.state or args.save_state:
            raise NlmError("--bench measures a fresh prompt; it takes no --state or --save-state")

        result = bench_generate(args.checkpoint, args.prompt, args.max_tokens, sampling, args.batch, args.seed,
                                device=args.device)
        _emit(result, args.json, [
            f"{result['model']}, batch {result['batch']}: first token in {result['first_token_ms']:.1f} ms, then "
            f"{result['tokens_per_s']:.0f} tokens/s ({result['tokens_per_s_per_stream']:.0f} per stream); "
            f"peak RSS {result['peak_rss_mb']:.0f} MB; bandwidth achieved {result['bandwidth_gb_s']:.2f} GB/s "
            f"({result['weight_bytes_per_step'] / 1e6:.1f} MB of weights a step) of "
            f"{result['memory_bandwidth_gb_s']:.1f} GB/s measured"])
        return 0
    if args.batch != 1:
        raise NlmError("--batch goes with --bench (generate streams one text)")
    lm = Loaded.open(args.checkpoint, device=args.device, slots=1)
    if args.state:
        context, tokens = lm.load_state(args.state)
        shown = lm.tokenizer.decode(tokens[-20:])
    else:
        context, tokens, shown = lm.start(), [lm.tokenizer.boundary], ""
    prompt = lm.encode(args.prompt, "--prompt")
    context = lm.engine.prefill(prompt, context)
    tokens += prompt
    write = lm.tokenizer.stream(after=shown + args.prompt)
    stream = lm.engine.submit(context, args.max_tokens, sampling, seed=args.seed)
    pieces = [args.prompt]
    if not args.json:
        sys.stdout.write(args.prompt)
    for event in lm.engine.run(stream):
        tokens.append(event.token)
        pieces.append(write(event.token))
        if not args.json:
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    if args.save_state:
        lm.save_state(args.save_state, stream.context, tokens)
    if args.json:
        _emit({"text": "".join(pieces), "generated": stream.generated, "tokens_behind": stream.context.length,
               "state": args.save_state}, True, [])
    else:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args, _) -> int:
    from neurallm.chat import Conversation, run
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(args.checkpoint, device=args.device, slots=1)
    conversation = Conversation(lm, Sampling(args.temperature, args.top_k, args.top_p), args.max_tokens, args.seed)
    if args.state:
        conversation.load(args.state)
    return run(conversation, show_stats=args.stats)


def cmd_serve(args, _) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise NlmError("nlm serve needs the serve extra: pip install 'neurallm[serve]'") from None
    from neurallm.serve.app import Limits, serve

    limits = Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                    queue_size=args.queue_size, max_sessions=args.max_sessions)
    return serve(args.checkpoints, args.host, args.port, args.api_key or os.environ.get("NLM_API_KEY") or None,
                 args.device, args.slots, limits, args.shutdown_grace, args.threads)


def cmd_export(args, _) -> int:
    from neurallm.export import export

    record = export(args.checkpoint, args.format, args.out, verify_tokens=args.verify_tokens,
                    verify_file=args.verify_file, max_ppl_rel_diff=None if args.max_ppl_diff is None
                    else args.max_ppl_diff / 100, progress=(lambda _: None) if args.json else print)
    v = record["verified"]
    _emit({"out": args.out, **record}, args.json, [
        f"wrote {args.out} ({args.format}: {', '.join(f['file'] for f in record['files'].values())}, "
        f"{sum(f['bytes'] for f in record['files'].values()) / 1e6:.1f} MB); logits within "
        f"{v['max_logit_diff']:.2g} of eager, perplexity {100 * v['ppl_rel_diff']:.5f}% apart"])
    return 0


def cmd_quantize(args, _) -> int:
    from neurallm.quantize import quantize_checkpoint

    if args.scheme is None and args.recipe is None:
        raise NlmError("nlm quantize: give --scheme or --recipe")
    record = quantize_checkpoint(args.checkpoint, args.scheme, args.out, recipe_file=args.recipe,
                                 max_increase=None if args.max_increase is None else args.max_increase / 100,
                                 tokens=args.tokens, verify_file=args.verify_file,
                                 progress=(lambda _: None) if args.json else print)
    v = record["validation"]
    budget = "none" if v["budget"] is None else f"{100 * v['budget']:g}%"
    _emit({"out": args.out, **record}, args.json, [
        f"wrote {args.out}: {v['bytes'] / 1e6:.2f} MB on disk ({v['bytes'] / v['bytes_fp32']:.0%} of fp32), "
        f"perplexity {100 * v['increase']:+.3f}% (budget {budget})"])
    return 0


def cmd_models(args, _) -> int:
    from neurallm import store

    if args.action == "list":
        rows = store.entries()
        if args.json:
            _emit({"home": str(store.home()), "models": [{**r, "path": str(r["path"])} for r in rows]}, True, [])
        else:
            print("\n".join(store.format_table(rows)) if rows else f"no stored models in {store.models_dir()}")
        return 0
    needed = {"where": 1, "remove": 1, "add": 2, "rename": 2}[args.action]
    if len(args.names) != needed:
        usage = {"where": "NAME", "remove": "NAME", "add": "CHECKPOINT NAME", "rename": "OLD NEW"}[args.action]
        raise NlmError(f"nlm models {args.action} {usage}")
    if args.action == "where":
        print(store.where(args.names[0]))
    elif args.action == "remove":
        store.remove(args.names[0])
        print(f"removed {args.names[0]}")
    elif args.action == "add":
        print(f"added {args.names[1]}: {store.add(args.names[0], args.names[1])}")
    else:
        print(f"renamed {args.names[0]} to {args.names[1]}: {store.rename(*args.names)}")
    return 0


def cmd_bench(args, _) -> int:
    from neurallm.bench import bench_variants, table

    result = bench_variants(args.checkpoint, args.variants.split(","), tokens=args.max_tokens,
                            eval_tokens=args.eval_tokens, work=args.work)
    _emit(result, args.json, table(result))
    return 0


def cmd_score(args, _) -> int:
    from neurallm import checkpoint
    from neurallm.data import corpora
    from neurallm.evaluate import score

    if (args.text is None) == (args.file is None):
        raise NlmError("nlm score: give exactly one of --text or --file")
    model, recipe, tokenizer = checkpoint.open_runner(args.checkpoint, device=args.device)
    text = args.text if args.text is not None else corpora.read_text(args.file)
    text = text[::-1] if recipe.data.reverse else text  # a backward model scores the text in its own direction
    result = score(model, tokenizer, text, source=args.file or "--text", unknown=args.unknown)
    lines = [f"{t['logprob']:10.4f}  {t['token']!r}" for t in result["tokens"]]
    lines.append(f"total log-probability {result['total_logprob']:.4f} over {result['count']} tokens "
                 f"(mean {result['mean_logprob']:.4f}){_vocabulary_note(result)}")
    _emit(result, args.json, lines)
    return 0


# nlm diagnose PROBE: the module and function that run it (each -> (result, lines)).
PROBES = {"gradients": ("flow", "gradients"), "depth": ("flow", "depth"), "explode": ("explode", "command"),
          "memory": ("memory", "command"), "dependency": ("dependency", "command"), "gates": ("gates", "command")}


def cmd_diagnose(args, _) -> int:
    import importlib

    module, function = PROBES[args.probe]
    result, lines = getattr(importlib.import_module(f"neurallm.diagnostics.{module}"), function)(args)
    _emit(result, args.json, lines)
    return 0


def cmd_compare(args, overrides: list[str]) -> int:
    from neurallm.diagnostics import compare

    result, lines = compare.command(args, overrides)
    _emit(result, args.json, lines)
    return 0


def cmd_data(args, _) -> int:
    from neurallm.data import corpora

    if args.action == "list":
        for name in sorted(corpora.REGISTRY):
            info = corpora.info(name)
            found = all(f["found"] for f in info["files"].values())
            print(f"{name:16} {'found' if found else 'missing':8} {info['task']:15} {info['description']}")
        return 0
    if not args.name:
        raise NlmError(f"nlm data {args.action}: name a corpus")
    if args.action == "download":
        corpora.download(corpora.get(args.name))
    print(json.dumps(corpora.info(args.name), indent=2))
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: expected a number > 0")
    return value


def nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 0")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (the --out of nlm train, an export, a quantized "
                                      "model) or a stored model's name")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _add_unknown_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown", default="error", choices=["error", "skip"],
                   help="characters outside a character model's vocabulary: an error (default), or left out of "
                        "the score and counted; word models map unknown words to <unk> and count them")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """What every train verb takes (nlm train, nlm tag train, nlm classify train)."""
    p.add_argument("recipe", help="a shipped recipe name or a path to a .toml file")
    p.add_argument("--out", help="run directory (default runs/RECIPE)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--json", action="store_true", help="last line: one JSON object summarising the run")
    p.add_argument("--no-progress", action="store_true")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float, top_p: float) -> None:
    p.add_argument("--max-tokens", type=positive, default=max_tokens, help="the most tokens to generate (a reply)")
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no cut")
    p.add_argument("--top-p", type=float, default=top_p, help="1: no cut")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # options every verb takes, before or after its name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an unexpected error (or set NLM_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="nlm", description="Recurrent neural language models.", parents=[common])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, **kwargs) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], **kwargs)

    p = verb("train", help="train a language model from a recipe",
                         epilog="Any recipe key can be overridden: --model.hidden_size=650 --train.lr=1")
    _add_train_args(p)
    p.add_argument("--save-as", metavar="NAME", help="then add the best checkpoint to the model store as NAME")
    p.set_defaults(func=cmd_train, overrides=True)

    p = verb("eval", help="perplexity or bits per character on a corpus split or a file")
    _add_model_args(p)
    p.add_argument("--data", help="corpus name (default: the one the model was trained on)")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--file", help="any UTF-8 text file instead of a corpus split")
    p.add_argument("--batch-size", type=positive, default=1, help="rows read in parallel (1: exact sequential score)")
    p.add_argument("--bptt", type=positive, default=70)
    _add_unknown_arg(p)
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic evaluation (Krause et al. 2018): learn from each segment after scoring it; "
                        "reports the static score beside it")
    p.add_argument("--dynamic.lr", dest="dynamic_lr", type=positive_float, default=1.0,
                   help="step size of the update after each segment (SGD)")
    p.add_argument("--dynamic.decay", dest="dynamic_decay", type=float, default=0.02,
                   help="pull back to the trained weights after each update (0: none)")
    p.add_argument("--dynamic.bptt", dest="dynamic_bptt", type=positive, default=20, help="tokens per segment")
    p.add_argument("--dynamic.method", dest="dynamic_method", default="sgd", choices=["sgd", "rms"],
                   help="the update: the gradient (sgd), or the gradient over its running RMS (rms)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = verb("compress", help="compress any file with a byte-level model that learns as it reads (or --model)",
             epilog="The decompressing machine must run the same torch version on the same kind of CPU "
                    "(both are written into the file and checked).")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", help="a byte-level checkpoint (nlm train --data.tokenizer=byte) to start from; "
                                   "decompressing then needs the same one")
    p.add_argument("--no-adapt", dest="adapt", action="store_false",
                   help="with --model: keep its weights as they are (faster; the n-gram counts still adapt)")
    p.add_argument("--segments", type=positive, help=f"parts of the file coded side by side as one batch (default 64, at most {MAX_SEGMENTS})")
    p.add_argument("--hidden", type=positive, help="LSTM units of a fresh model (default 64)")
    p.add_argument("--layers", type=positive, help="layers of a fresh model (default 1)")
    p.add_argument("--lr", type=positive_float, help="Adam's step size while it learns")
    p.add_argument("--window", type=positive, help="bytes of each segment between two updates")
    p.add_argument("--learn-every", dest="learn_every", type=positive,
                   help="learn from every n-th segment of each window (default 2; 1: all, slower)")
    p.add_argument("--seed", type=nonnegative, help="the fresh model's initial weights")
    p.add_argument("--threads", type=positive, default=1, help="torch threads (decompression uses the same)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object: sizes, bits per byte, time, speed")
    p.set_defaults(func=cmd_compress)

    p = verb("decompress", help="restore a file written by nlm compress (its CRC-32 checked)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", help="the prior model the file was compressed with, if any")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--ignore-platform", action="store_true",
                   help="try even where torch or the CPU kind differs from the compressing machine's")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_decompress)

    p = verb("generate", help="stream sampled text")
    _add_model_args(p)
    p.add_argument("--prompt", default="")
    _add_sampling_args(p, max_tokens=200, temperature=1.0, top_p=1.0)
    p.add_argument("--state", metavar="FILE", help="continue from a state file (the prompt follows its text)")
    p.add_argument("--save-state", metavar="FILE", help="write the state after the prompt and the generated text")
    p.add_argument("--bench", action="store_true",
                   help="measure: time to first token, tokens/s after it, peak memory (no text is printed)")
    p.add_argument("--batch", type=positive, default=1, help="with --bench: streams decoded together")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text")
    p.set_defaults(func=cmd_generate)

    p = verb("chat", help="an interactive conversation in the terminal, the state carried from turn to turn")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=300, temperature=0.8, top_p=0.95)
    p.add_argument("--state", metavar="FILE", help="continue a conversation saved with /save")
    p.add_argument("--stats", action="store_true", help="after each reply, its speed")
    p.set_defaults(func=cmd_chat)

    p = verb("serve", help="an OpenAI-compatible HTTP API and a chat page (needs the serve extra)")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories or stored names; each is a model named "
                                                  "after its folder or store name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but the page "
                                     "(or set NLM_API_KEY)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--slots", type=positive, default=32, help="streams decoded together per model")
    p.add_argument("--threads", type=positive, help="threads of the decoding step (default: half the cores)")
    p.add_argument("--queue-size", type=positive, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--max-tokens-limit", type=positive, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=positive, default=16384)
    p.add_argument("--max-sessions", type=positive, default=100_000)
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds requests in flight get to finish on SIGTERM before they are cancelled")
    p.set_defaults(func=cmd_serve)

    p = verb("score", help="log-probability of each token of a text")
    _add_model_args(p)
    p.add_argument("--text")
    p.add_argument("--file")
    _add_unknown_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)

    p = verb("export", help="write step/prefill/head functions for onnxruntime, TorchScript or torch.export, "
                            "verified against eager")
    p.add_argument("checkpoint", help="checkpoint directory or stored model name")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "pt2"])
    p.add_argument("--out", required=True, help="directory to write (replaced whole, only once verified)")
    p.add_argument("--verify-tokens", type=positive, default=2000, help="held-out tokens the export is checked on")
    p.add_argument("--verify-file", help="check on this text instead of the model's validation split")
    p.add_argument("--max-ppl-diff", type=float, metavar="PCT",
                   help="perplexity budget in percent (default 0.01; 1 for a quantized model's int8 ONNX)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = verb("quantize", help="write an int8, int4-weight or bf16 checkpoint, its perplexity change checked")
    p.add_argument("checkpoint", help="checkpoint directory or stored model name")
    p.add_argument("--scheme", choices=["int8", "int4-weight", "bf16"])
    p.add_argument("--recipe", metavar="FILE.json",
                   help='a mixed plan: {"scheme": "int8", "group_size": 64, "layers": {"stack": "fp32"}}')
    p.add_argument("--out", required=True)
    p.add_argument("--max-increase", type=float, metavar="PCT",
                   help="refuse a perplexity rise above this, in percent (default: int8 2, int4-weight 5, bf16 0.5)")
    p.add_argument("--tokens", type=positive, default=20000, help="held-out tokens the perplexity is measured on")
    p.add_argument("--verify-file", help="measure on this text instead of the model's validation split")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = verb("models", help="the model store: list, where NAME, add CHECKPOINT NAME, remove NAME, rename OLD NEW")
    p.add_argument("action", choices=["list", "where", "add", "remove", "rename"])
    p.add_argument("names", nargs="*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = verb("bench", help="eager, exported and quantized variants of a model side by side")
    p.add_argument("checkpoint", help="checkpoint directory or stored model name (an fp32 LM)")
    p.add_argument("--variants", default=",".join(("eager", "onnx", "torchscript", "pt2", "int8", "int4-weight",
                                                   "bf16", "int8-onnx")))
    p.add_argument("--max-tokens", type=positive, default=200, help="tokens per stream at batch 1 (batch 32: a quarter)")
    p.add_argument("--eval-tokens", type=positive, default=5000)
    p.add_argument("--work", help="keep the variants in this folder (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    for name, what in (("tag", "sequence tagging (POS, NER)"), ("classify", "sentence classification")):
        p = verb(name, help=f"{what}: train RECIPE, eval CHECKPOINT, predict CHECKPOINT",
                 epilog="train takes recipe overrides as nlm train does: --model.hidden_size=300")
        actions = p.add_subparsers(dest="action", required=True)
        t = actions.add_parser("train", parents=[common], help="train from a recipe")
        _add_train_args(t)
        t.add_argument("--init-from", metavar="LM", help="start the encoder from an nlm language model "
                                                         "(discriminative rates; task.unfreeze_steps for gradual unfreezing)")
        t.set_defaults(func=cmd_task, overrides=True)
        e = actions.add_parser("eval", parents=[common], help="accuracy" + (", entity P/R/F1" if name == "tag" else "")
                               + " on a corpus split or a file")
        e.add_argument("checkpoint")
        e.add_argument("--data", help="corpus name (default: the one the model was trained on)")
        e.add_argument("--split", default="dev", choices=["train", "dev", "test"])
        e.add_argument("--file", help="a CoNLL-U or CoNLL column file" if name == "tag" else
                       "a TSV of text, tab, label (header optional)")
        e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        e.add_argument("--json", action="store_true")
        e.set_defaults(func=cmd_task)
        q = actions.add_parser("predict", parents=[common], help="label text from a file or stdin")
        q.add_argument("checkpoint")
        q.add_argument("--file", help="input (default: stdin)")
        q.add_argument("--input", default="lines", choices=["lines", "tokens"],
                       help="lines: a sentence per line, words split on spaces; tokens: a token per line, "
                            "a blank line after each sentence")
        q.add_argument("--batch-size", type=positive, default=64)
        q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        q.add_argument("--json", action="store_true", help="one JSON object per sentence")
        q.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=cmd_task)

    p = verb("diagnose", help="the gradient lab: gradients, depth, explode, memory, dependency, gates",
             description="Measure why gated cells beat vanilla RNNs; each probe prints its figures, writes a JSON "
                         "file and PNG plots (with the plots extra) to --out, and --json prints the figures.")
    probes = p.add_subparsers(dest="probe", required=True)

    def probe(name: str, help: str) -> argparse.ArgumentParser:
        q = probes.add_parser(name, parents=[common], help=help)
        q.add_argument("--out", help=f"folder for the plots and JSON (default runs/diagnose/{name})")
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--json", action="store_true", help="print one JSON object with the figures")
        return q

    def built_model(q: argparse.ArgumentParser, cell: str, layers: int, hidden: int) -> None:
        """A model built by the probe (at initialisation) rather than read from a checkpoint."""
        q.add_argument("--cell", default=cell, help="rnn (tanh), rnn_relu, lstm or gru")
        q.add_argument("--layers", type=positive, default=layers)
        q.add_argument("--hidden", type=positive, default=hidden, help="units per layer")
        q.add_argument("--emb", type=positive, default=hidden, help="embedding size")
        q.add_argument("--connection", default="none", choices=["none", "residual", "highway", "dense"])

    q = probe("gradients", "‖∂J(t)/∂h(k)‖ against the distance t - k, per layer, and the recurrent matrices' "
                           "singular values")
    q.add_argument("checkpoint", nargs="?", help="a trained LM (measured beside its architecture at initialisation); "
                                                 "or none and --cell for a model at initialisation")
    built_model(q, "rnn", 1, 200)
    q.add_argument("--data", help="corpus to read (default: the checkpoint's, or ptb)")
    q.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    q.add_argument("--length", type=positive, default=200, help="time steps back from the loss")
    q.add_argument("--rows", type=positive, default=32, help="text positions averaged (one backward pass each batch)")
    q.add_argument("--warmup", type=nonnegative, default=100, help="tokens read before the window (the state is not zero)")
    q.add_argument("--factor", type=float, default=1000.0, help="decay_distance: where the norm has fallen this much")
    q.set_defaults(func=cmd_diagnose)

    q = probe("depth", "gradient flow through the layers of deep stacks with each connection")
    q.add_argument("--cell", default="lstm", help="rnn (tanh), rnn_relu, lstm or gru")
    q.add_argument("--layers", default="2,4,8", help="stack depths")
    q.add_argument("--connections", default="none,residual,highway,dense")
    q.add_argument("--hidden", type=positive, default=128)
    q.add_argument("--data", default="ptb")
    q.add_argument("--length", type=positive, default=50)
    q.add_argument("--rows", type=positive, default=16)
    q.add_argument("--warmup", type=nonnegative, default=50)
    q.add_argument("--steps", type=nonnegative, default=0, help="train each stack this many steps first (0: at initialisation)")
    q.set_defaults(func=cmd_diagnose)

    q = probe("explode", "train with and without clipping, and with the recurrent weights scaled up")
    built_model(q, "rnn", 1, 128)
    q.add_argument("--data", default="ptb")
    q.add_argument("--steps", type=positive, default=300)
    q.add_argument("--lr", type=float, default=1.0, help="SGD rate")
    q.add_argument("--clip", type=float, default=0.25, help="gradient-norm clip of the clipped runs")
    q.add_argument("--scale", type=float, default=3.0, help="the scaled runs' recurrent weights times this")
    q.add_argument("--batch-size", type=positive, default=20)
    q.add_argument("--bptt", type=positive, default=35)
    q.set_defaults(func=cmd_diagnose)

    q = probe("memory", "synthetic tasks whose answer lies d steps back: the largest d each cell solves")
    q.add_argument("--cells", default="rnn,lstm,gru")
    q.add_argument("--tasks", default="copy,adding", help="copy (recall a symbol after d steps of noise), adding")
    q.add_argument("--distances", default="5,10,20,50,100")
    q.add_argument("--params", type=positive, default=20000, help="each cell sized to about this many parameters")
    q.add_argument("--steps", type=positive, default=1500, help="training steps per cell, task and distance")
    q.add_argument("--batch-size", type=positive, default=64)
    q.add_argument("--lr", type=float, default=3e-3, help="Adam's rate")
    q.add_argument("--seeds", type=positive, default=1, help="repeat each setting with this many seeds")
    q.add_argument("--eval-size", type=positive, default=1000, help="held-out sequences per setting")
    q.set_defaults(func=cmd_diagnose)

    q = probe("dependency", "how much a trained LM raises a word it saw d tokens earlier in the document")
    q.add_argument("checkpoints", nargs="+", help="language models to compare (same corpus)")
    q.add_argument("--data", help="corpus (default: the first checkpoint's)")
    q.add_argument("--split", default="test", choices=["train", "valid", "test"])
    q.add_argument("--tokens", type=positive, default=100000, help="tokens of the split read")
    q.add_argument("--per-bin", type=positive, default=300, help="repeated words measured per distance bin")
    q.set_defaults(func=cmd_diagnose)

    q = probe("gates", "gate saturation over a corpus and a heat map of chosen units over a passage")
    q.add_argument("checkpoint")
    q.add_argument("--text", help="the passage drawn (default: the start of the model's validation text)")
    q.add_argument("--file", help="read the passage from this file")
    q.add_argument("--tokens", type=positive, default=20000, help="validation tokens the saturation is measured on")
    q.add_argument("--units", help="units drawn, e.g. 3,17,250 (default: the most active few)")
    q.add_argument("--layer", type=int, default=-1, help="layer drawn (0 = the bottom; -1 = the top)")
    q.add_argument("--chars", type=positive, default=600, help="length of the default passage (tokens)")
    q.set_defaults(func=cmd_diagnose)

    p = verb("compare", help="train RNN, LSTM and GRU on one recipe under one budget; a Markdown report",
             description="Trains each cell on the recipe one after another (without --steps or --minutes, for the "
                         "recipe's whole schedule: hours for ptb-small), then writes report.md, compare.json and plots.",
             epilog="Recipe overrides apply to every cell: --model.hidden_size=300")
    p.add_argument("recipe", help="a shipped language-model recipe name or a .toml file")
    p.add_argument("--cells", default="rnn,lstm,gru", help="cells to train, in order (rnn, rnn_relu, lstm, gru)")
    p.add_argument("--minutes", type=float, help="wall-clock budget per cell")
    p.add_argument("--steps", type=positive, help="step budget per cell")
    p.add_argument("--match", default="size", choices=["size", "params"],
                   help="size: the recipe's sizes for every cell; params: each hidden size set to match the "
                        "first cell's parameter count")
    p.add_argument("--valid-every", type=positive, help="validate every this many steps (the curve's points)")
    p.add_argument("--out", help="folder of the runs and report (default runs/compare/RECIPE)")
    p.add_argument("--resume", action="store_true", help="go on with the runs in --out")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare, overrides=True)

    p = verb("data", help="known corpora: list, info NAME, download NAME")
    p.add_argument("action", choices=["list", "info", "download"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_data)
    return parser


def _where(error: BaseException) -> str:
    """file:line of the innermost frame of neurallm's own code (deeper frames are torch's or Python's)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "neurallm" in Path(f.filename).parts] or frames
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("NLM_DEBUG", "").lower() not in ("", "0", "false", "no")
    if rest and not getattr(args, "overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except NlmError as e:
        print(f"nlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (nlm ... | head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
        return 141
    except BaseException as e:  # a bug or an environment problem, not bad input: one line, the details on request
        # (BaseException: a Rust library's panic arrives as pyo3's PanicException, which is not an Exception)
        if debug or isinstance(e, (SystemExit, GeneratorExit)):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"nlm: internal error: {type(e).__name__}: {message} (in {_where(e)}; "
              f"run again with --debug or NLM_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
