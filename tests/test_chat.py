"""nlm chat in a real terminal (tmux), and state files through nlm generate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import last_json
from neurallm.cli import main


def generate(capsys, run, *args) -> dict:
    assert main(["generate", str(run), "--temperature", "0", "--json", *args]) == 0
    return last_json(capsys)


def test_greedy_from_a_saved_state_equals_greedy_from_the_whole_text(char_run, tmp_path, capsys):
    state = tmp_path / "s.safetensors"
    first = generate(capsys, char_run, "--prompt", "ROMEO:\n", "--max-tokens", "30", "--save-state", str(state))
    assert first["tokens_behind"] == 1 + 7 + 30  # boundary, prompt, generated
    more = generate(capsys, char_run, "--state", str(state), "--max-tokens", "25")["text"]
    # One run of 55 tokens, and the whole text read afresh as a prompt, continue the same way.
    once = generate(capsys, char_run, "--prompt", "ROMEO:\n", "--max-tokens", "55")["text"]
    assert first["text"] + more == once
    again = generate(capsys, char_run, "--prompt", first["text"], "--max-tokens", "25")["text"]
    assert again == first["text"] + more
    # A prompt after a state reads on from it.
    after = generate(capsys, char_run, "--state", str(state), "--prompt", "\n", "--max-tokens", "10")["text"]
    assert after == "\n" + generate(capsys, char_run, "--prompt", first["text"] + "\n", "--max-tokens", "10")[
        "text"][len(first["text"]) + 1:]


def test_bad_state_files_are_refused_and_nothing_is_overwritten(char_run, word_run, tmp_path, capsys):
    state = tmp_path / "s.safetensors"
    generate(capsys, char_run, "--prompt", "A", "--max-tokens", "5", "--save-state", str(state))
    original = state.read_bytes()
    assert main(["generate", str(word_run), "--state", str(state), "--save-state", str(state)]) == 2
    assert "belongs to another model" in capsys.readouterr().err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(original[: len(original) // 2])
    assert main(["generate", str(char_run), "--state", str(cut), "--save-state", str(state)]) == 2
    assert "not a readable state file" in capsys.readouterr().err
    altered = bytearray(original)
    altered[-5] ^= 0x55
    cut.write_bytes(bytes(altered))
    assert main(["generate", str(char_run), "--state", str(cut)]) == 2
    assert "altered or damaged" in capsys.readouterr().err
    assert main(["generate", str(char_run), "--state", str(tmp_path / "none.safetensors")]) == 2
    assert "no such state file" in capsys.readouterr().err
    assert state.read_bytes() == original  # every refusal came before any write


def test_generate_bench_reports_speed(char_run, capsys):
    assert main(["generate", str(char_run), "--bench", "--batch", "3", "--max-tokens", "20", "--json"]) == 0
    result = last_json(capsys)
    assert result["batch"] == 3 and result["tokens"] == 60
    assert result["tokens_per_s"] > 0 and result["first_token_ms"] > 0 and result["peak_rss_mb"] > 10


def test_a_conversation_reads_only_each_turns_new_tokens(char_run, tmp_path):
    from neurallm.chat import Conversation
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded, StopText

    lm = Loaded.open(char_run, slots=1)
    fmt = lm.chat
    chat = Conversation(lm, Sampling(temperature=0), max_tokens=30)
    "".join(chat.reply("Good morrow"))
    cut_short = chat.open_turn  # then the turn end is written before the next message
    second = "".join(chat.reply("Hark"))
    new_text = (fmt.turn_end if cut_short else "") + fmt.user + "Hark" + fmt.turn_end + fmt.assistant
    assert chat.last["prompt_tokens"] == len(lm.encode(new_text, "t"))
    # The whole conversation read afresh gives the same second reply.
    before = chat.tokens[1:len(chat.tokens) - chat.last["reply_tokens"]]
    stream = lm.engine.submit(lm.engine.prefill(before, lm.start()), 30, Sampling(temperature=0))
    text = StopText(lm.tokenizer, [fmt.turn_end])
    fresh = ""
    for event in lm.engine.run(stream):
        fresh += text.push(event.token)
        if text.stopped:
            break
    assert fresh + ("" if text.stopped else text.flush()) == second
    # Saved and loaded, a conversation goes on the same way.
    chat.save(tmp_path / "c.st")
    other = Conversation(lm, Sampling(temperature=0), max_tokens=30)
    other.load(tmp_path / "c.st")
    assert other.open_turn == chat.open_turn
    assert "".join(other.reply("Farewell")) == "".join(chat.reply("Farewell"))


TMUX = shutil.which("tmux")


@pytest.mark.skipif(TMUX is None and os.environ.get("NLM_REQUIRE_BROWSER") != "1", reason="tmux is not installed")
def test_chat_in_a_terminal_streams_replies_and_survives_ctrl_c(char_run, tmp_path):
    from neurallm.chat import Conversation
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    expected = "".join(Conversation(Loaded.open(char_run, slots=1), Sampling(temperature=0), 40).reply("Good morrow"))
    name = f"nlm-chat-{os.getpid()}"
    command = f"{sys.executable} -m neurallm chat {char_run} --temperature 0 --max-tokens 40"
    subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "200", "-y", "50", command], check=True)

    def screen() -> str:
        return subprocess.run([TMUX, "capture-pane", "-p", "-t", name, "-S", "-200"], capture_output=True,
                              text=True).stdout

    def wait_for(text: str, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = screen()
            if text in out:
                return out
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    def send(*keys: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", name, *keys], check=True)

    try:
        wait_for("ROMEO>")  # capture-pane drops trailing spaces
        send("Good morrow", "Enter")
        shown = wait_for("JULIET> " + expected.split("\n")[0])
        assert expected.replace("\n", "") in shown.replace("\n", "")
        send("/stats", "Enter")
        wait_for("tokens/s")
        send("/set max_tokens=1", "Enter")
        wait_for("expected temperature=X")  # an error in a command leaves the session running
        chat_dir = tmp_path / "saved.st"
        send(f"/save {chat_dir}", "Enter")
        wait_for("saved the state")
        assert chat_dir.is_file()
        send("/quit", "Enter")
        deadline = time.time() + 10
        while subprocess.run([TMUX, "has-session", "-t", name], capture_output=True).returncode == 0:
            assert time.time() < deadline, screen()
            time.sleep(0.1)
    finally:
        subprocess.run([TMUX, "kill-session", "-t", name], capture_output=True)


@pytest.mark.skipif(TMUX is None and os.environ.get("NLM_REQUIRE_BROWSER") != "1", reason="tmux is not installed")
def test_ctrl_c_stops_the_reply_not_the_session(char_run):
    name = f"nlm-chat-c-{os.getpid()}"
    command = f"{sys.executable} -m neurallm chat {char_run} --max-tokens 4000 --temperature 1"
    subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "120", "-y", "40", command], check=True)
    capture = [TMUX, "capture-pane", "-p", "-t", name, "-S", "-500"]
    try:
        for _ in range(300):
            if "ROMEO>" in subprocess.run(capture, capture_output=True, text=True).stdout:
                break
            time.sleep(0.1)
        subprocess.run([TMUX, "send-keys", "-t", name, "Hark", "Enter"], check=True)
        time.sleep(0.5)
        subprocess.run([TMUX, "send-keys", "-t", name, "C-c"], check=True)
        for _ in range(100):
            out = subprocess.run(capture, capture_output=True, text=True).stdout
            if "[stopped]" in out:
                break
            time.sleep(0.1)
        assert "[stopped]" in out, out
        subprocess.run([TMUX, "send-keys", "-t", name, "/stats", "Enter"], check=True)
        for _ in range(100):
            out = subprocess.run(capture, capture_output=True, text=True).stdout
            if "1 turns" in out:
                break
            time.sleep(0.1)
        assert "1 turns" in out, out
    finally:
        subprocess.run([TMUX, "kill-session", "-t", name], capture_output=True)


def test_chat_reads_commands_and_messages_from_a_pipe(char_run, tmp_path):
    script = "Good morrow\n/set temperature=0 top_k=5\n/stats\n/reset\n/stats\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "neurallm", "chat", str(char_run), "--max-tokens", "20"],
                         input=script, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "temperature=0.0 top_k=5" in out.stdout and "(conversation reset)" in out.stdout
    assert "1 tokens behind the state, 0 turns" in out.stdout


def test_a_state_file_edited_with_a_fresh_checksum_is_still_refused(char_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from neurallm import state as state_mod

    path = tmp_path / "s.safetensors"
    generate(capsys, char_run, "--prompt", "A", "--max-tokens", "3", "--save-state", str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta["pending"] = "100000"  # outside the vocabulary, checksum recomputed to match
    meta["checksum"] = state_mod._checksum(tensors["state"], tensors["tokens"], meta)
    save_file(tensors, str(path), metadata=meta)
    assert main(["generate", str(char_run), "--state", str(path)]) == 2
    assert "does not hold together" in capsys.readouterr().err
