"""Every verb of the command line runs; bad input gets one clear line and exit status 2."""

import json
import math
import subprocess
import sys

import pytest

from neurallm.cli import main

from conftest import TINY, last_json, need


def test_train_json_summary(char_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "3", "--json", "--no-progress",
                 f"--data.corpus={char_corpus}", *TINY]) == 0
    summary = last_json(capsys)
    assert summary["steps"] == 3 and summary["checkpoint"] == str(out) and summary["interrupted"] is False
    assert summary["tokens"] == 3 * 4 * 8  # steps x batch x bptt of TINY
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["elapsed_seconds"])
    assert summary["train_step_tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_seconds"])
    assert summary["train_seconds"] <= summary["elapsed_seconds"] <= summary["seconds"]
    assert summary["valid_bpc"] == pytest.approx(summary["valid_loss"] / math.log(2))
    assert summary["valid_perplexity"] == pytest.approx(math.exp(summary["valid_loss"]))
    assert 0 < summary["train_loss"] < 2 * math.log(65)  # about ln(65 characters) after 3 steps


def test_eval_split_and_file_and_score_agree(word_run, word_corpus, capsys):
    assert main(["eval", str(word_run), "--data", str(word_corpus), "--split", "test", "--json"]) == 0
    on_split = last_json(capsys)
    assert on_split["perplexity"] == pytest.approx(math.exp(on_split["nll"]))
    assert on_split["tokens_per_s"] == pytest.approx(on_split["tokens"] / on_split["seconds"])
    test_file = word_corpus / "test.txt"
    assert main(["eval", str(word_run), "--file", str(test_file), "--json"]) == 0
    on_file = last_json(capsys)
    assert on_file["tokens"] == on_split["tokens"] and on_file["nll"] == pytest.approx(on_split["nll"], abs=1e-6)
    assert main(["score", str(word_run), "--file", str(test_file), "--json"]) == 0
    scored = last_json(capsys)
    assert len(scored["tokens"]) == on_file["tokens"]
    assert -scored["total_logprob"] / len(scored["tokens"]) == pytest.approx(on_file["nll"], rel=1e-6)
    assert all(t["logprob"] <= 0 for t in scored["tokens"])


def test_char_eval_reports_bits_per_character(char_run, char_corpus, capsys):
    assert main(["eval", str(char_run), "--data", str(char_corpus), "--split", "valid", "--json"]) == 0
    result = last_json(capsys)
    assert result["bpc"] == pytest.approx(result["nll"] / 0.6931471805599453)
    assert result["tokens"] == len((char_corpus / "valid.txt").read_text())


def test_score_text_human_output(char_run, capsys):
    assert main(["score", str(char_run), "--text", "ROMEO:", "--json"]) == 0
    scored = last_json(capsys)
    assert main(["score", str(char_run), "--text", "ROMEO:"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert len(lines) == len("ROMEO:") + 1
    for line, token in zip(lines, scored["tokens"]):  # one line per character: its log-probability, then itself
        assert line == f"{token['logprob']:10.4f}  {token['token']!r}"
    assert [t["token"] for t in scored["tokens"]] == list("ROMEO:")
    assert lines[-1] == (f"total log-probability {scored['total_logprob']:.4f} over 6 tokens "
                         f"(mean {scored['total_logprob'] / 6:.4f})")


def test_generate_streams_repeatably(char_run, capsys):
    args = ["generate", str(char_run), "--prompt", "ROMEO:", "--max-tokens", "40", "--seed", "3", "--top-k", "10"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1
    assert main(args[:-4] + ["--seed", "4"]) == 0
    assert capsys.readouterr().out != first
    greedy = ["generate", str(char_run), "--prompt", "A", "--max-tokens", "20", "--temperature", "0"]
    assert main(greedy + ["--seed", "1"]) == 0
    g1 = capsys.readouterr().out
    assert main(greedy + ["--seed", "2"]) == 0
    assert capsys.readouterr().out == g1  # greedy ignores the seed


def test_word_generate_and_data_verbs(word_run, capsys):
    assert main(["generate", str(word_run), "--prompt", "the company", "--max-tokens", "5", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("the company ")
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    names = ("conll2003", "ptb", "sst2", "sst5", "tinyshakespeare", "ud-english-ewt", "wikitext-2")
    found = {name: "found" if need(name).is_dir() else "missing" for name in names}
    assert [line.split()[:2] for line in listing] == [[name, state] for name, state in sorted(found.items())]
    assert listing[names.index("conll2003")].split()[2] == "tagging" and listing[names.index("sst2")].split()[2] == \
        "classification"
    assert main(["data", "info", "ptb"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"]["ptb.train.txt"]["sha256"].startswith("fcea919f")


def run_nlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "neurallm", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path):
    result = run_nlm("train", "ptb-small", "--model.hiden_size=3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown key model.hiden_size" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "ptb-small", "--model.cell=transformer"], "model.cell"),
    (["train", "ptb-small", "--train.lr=fast"], "bad value for train.lr"),
    (["train", "nope"], "unknown recipe 'nope'"),
    (["eval", "/nonexistent/ckpt"], "no such checkpoint directory"),
])
def test_bad_input_messages(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [(b"", "empty corpus"), (b"caf\xe9 au lait\n", "not UTF-8 text")])
def test_bad_corpus_files(tmp_path, capsys, content, message):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "train.txt").write_bytes(content)
    (corpus / "valid.txt").write_text("valid text\n")
    assert main(["train", "ptb-small", "--out", str(tmp_path / "r"), f"--data.corpus={corpus}", *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and str(corpus / "train.txt") in err
    (corpus / "train.txt").write_text("some words\n" * 50)
    (corpus / "valid.txt").unlink()
    assert main(["train", "ptb-small", "--out", str(tmp_path / "r"), f"--data.corpus={corpus}", *TINY]) == 2
    assert "valid.txt: no such file" in capsys.readouterr().err


def test_adaptive_softmax_cutoffs_above_a_small_vocabulary(char_corpus, tmp_path, capsys):
    args = ["train", "shakespeare-char", "--model.softmax=adaptive", f"--data.corpus={char_corpus}", *TINY]
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    assert "model.adaptive_cutoffs: [2000, 10000] leave no cluster below the vocabulary size" in capsys.readouterr().err
    assert main([*args, "--model.adaptive_cutoffs=20", "--max-steps", "2", "--no-progress", "--out",
                 str(tmp_path / "ok")]) == 0


def test_unwritable_out_directory(word_corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = ["train", "ptb-small", f"--data.corpus={word_corpus}", *TINY, "--out", str(tmp_path / "file" / "run")]
    assert main(args) == 2
    assert "cannot create the run directory" in capsys.readouterr().err


def test_prompt_outside_character_vocabulary(char_run, capsys):
    assert main(["generate", str(char_run), "--prompt", "ROMEO: ✓"]) == 2
    assert "--prompt: character '✓' at position 7" in capsys.readouterr().err


def test_eval_file_errors(char_run, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert main(["eval", str(char_run), "--file", str(bad)]) == 2
    assert "bad.txt: not UTF-8 text" in capsys.readouterr().err
    assert main(["score", str(char_run)]) == 2
    assert "exactly one of --text or --file" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(char_run, monkeypatch, capsys):
    import neurallm.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside\nwith a second line")

    monkeypatch.setattr(neurallm.evaluate, "evaluate", broken)
    assert main(["eval", str(char_run)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nlm: internal error: RuntimeError: something deep inside (in ")
    assert lines[0].endswith("run again with --debug or NLM_DEBUG=1 for the full traceback)")
    for args in (["--debug", "eval", str(char_run)], ["eval", str(char_run), "--debug"]):
        with pytest.raises(RuntimeError, match="something deep inside"):
            main(args)
    monkeypatch.setenv("NLM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["eval", str(char_run)])
    monkeypatch.setenv("NLM_DEBUG", "0")
    assert main(["eval", str(char_run)]) == 1
