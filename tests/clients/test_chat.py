"""`memserve chat` as a user runs it, stdin piped, against a real server with the small
VMED: replies stream, every slash command works, Ctrl-C at the prompt ends it, errors are
one clear line, a reply cut by the server's kill -9 and restart is resumed and shown once,
and --help tells the truth. (Ctrl-C during a reply needs a reply that waits:
test_interrupts.py holds one on the stand-in server; a reply cut short after chosen pieces,
the stand-in server too.)"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.child_server import ServerProcess
from clients import Client, MemserveError
from clients.chat import COMMANDS, add_chat_parser, run_chat
from memserve.cli import build_parser
from tests.clients.fake_server import FakeServer
from tests.clients.servers import (
    DIRECT,
    LIMIT,
    ROOT,
    TINY,
    Durable,
    Watched,
    served,
    subprocess_env,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory) as process:
        yield process


def chat_command(server: ServerProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "memserve", "chat", "--target", server.target,
            "--model", TINY, *args]  # fmt: skip


def chat(server: ServerProcess, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the chat with `lines` piped to it, to the end."""
    return subprocess.run(
        chat_command(server, "--max-tokens", "6", *args), input="".join(f"{x}\n" for x in lines),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def assert_gone(server: ServerProcess, session_ids: set[str]) -> None:
    with Client(server.target, options=DIRECT) as client:
        for session_id in session_ids:
            with pytest.raises(MemserveError) as gone:
                client.get_session(session_id)
            assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_every_command_through_a_pipe(server: ServerProcess, tmp_path: Path) -> None:
    saved = tmp_path / "conversation.safetensors"
    result = chat(server, [
        "hi ! how are you ?", "/help", "/fork", "do you have pets ?", f"/save {saved}",
        "/reset", "what do you do ?", f"/load {saved}", "i like cars .", "/frob", "/save",
        f"/load {tmp_path / 'missing'}", "", "/quit", "not read",
    ], "--seed", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    help_lines = [line for line in lines if line.startswith("/")]
    assert [line.split()[0] for line in help_lines] == [
        "/help",
        "/reset",
        "/fork",
        "/save",
        "/load",
        "/quit",
    ]
    replies = [line for line in lines if not line.startswith("/")]
    assert len(replies) == 4 and all(replies)  # "not read" came after /quit

    fork = re.search(r"now in session (\w+), a fork of (\w+)", result.stderr)
    reset = re.search(r"new conversation: session (\w+) \(deleted (\w+)\)", result.stderr)
    save = re.search(r"saved session (\w+) \(step (\d+), \d+ bytes\)", result.stderr)
    load = re.search(rf"loaded .*: session (\w+) \({TINY}, step (\d+)\); deleted (\w+)",
                     result.stderr)  # fmt: skip
    assert fork and reset and save and load, result.stderr
    forked, original = fork.groups()
    assert forked != original and reset.group(2) == forked == save.group(1)
    assert load.group(3) == reset.group(1) and load.group(2) == save.group(2)
    assert saved.stat().st_size > 0
    assert "unknown command /frob (/help lists the commands)" in result.stderr
    assert "usage: /save FILE" in result.stderr
    assert "/load: No such file or directory" in result.stderr
    # The chat deleted every session it made: the original kept after /fork too.
    assert_gone(server, {original, forked, reset.group(1), load.group(1)})


def test_load_continues_the_saved_conversation(server: ServerProcess, tmp_path: Path) -> None:
    saved = tmp_path / "state"
    first = chat(server, ["hi ! how are you ?", f"/save {saved}", "i like cars ."], "--seed", "5")
    resumed = chat(server, [f"/load {saved}", "i like cars ."], "--seed", "5")
    fresh = chat(server, ["i like cars ."], "--seed", "5")
    assert first.returncode == resumed.returncode == fresh.returncode == 0
    # Same seed, same history: the same reply; without the history, another one.
    assert resumed.stdout.splitlines() == first.stdout.splitlines()[1:]
    assert fresh.stdout != resumed.stdout


def test_ctrl_c_at_the_prompt_ends_the_chat(server: ServerProcess) -> None:
    with Watched(chat_command(server, "--max-tokens", "4")) as chat:
        chat.send("hello")
        # Answered: the chat puts Ctrl-C back to ending the chat before it ends the reply's
        # line, so from this newline on a Ctrl-C is one at the prompt.
        chat.wait_for(lambda: chat.text().endswith("\n"))
        chat.process.send_signal(signal.SIGINT)
        assert chat.wait(30) == 130
        assert chat.text().count("\n") == 2  # the reply's line, then the prompt's
        stderr = chat.text("stderr")
        assert "Traceback" not in stderr and "(reply stopped)" not in stderr


def test_start_errors_are_one_clear_line(server: ServerProcess) -> None:
    unknown = subprocess.run(
        [*chat_command(server)[:-2], "--model", "no-such-model"], input="hi\n", cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("memserve chat: error: no model 'no-such-model'")
    assert unknown.stderr.count("\n") == 1
    unreachable = subprocess.run(
        [sys.executable, "-m", "memserve", "chat", "--target", "127.0.0.1:1"], input="hi\n",
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert "cannot reach the server at 127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    not_text = chat(server, ["hello", "/quit"], "--model", "ntm-copy")
    assert not_text.returncode == 1 and not_text.stdout == ""
    assert not_text.stderr == (
        "memserve chat: error: model 'ntm-copy' (ntm) does not generate text; the chat needs "
        "a dialogue model (vmed), e.g. vmed-chat\n"
    )
    bad = chat(server, [], "--cert", "only.pem")
    assert bad.returncode == 2 and "--cert and --key go together" in bad.stderr


def test_a_failed_turn_still_ends_its_line(server: ServerProcess) -> None:
    # Over the server's --max-new-tokens: every turn is refused, and each still gets its
    # (empty) line, so line n of stdout stays the reply to line n of stdin.
    result = chat(server, ["hello", "/help", "and again"], "--max-tokens", str(LIMIT + 1))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "" and lines[-2:] == ["", ""] and len(lines) == 3 + len(COMMANDS)
    assert result.stderr.count(f"max_tokens must be between 1 and {LIMIT}") == 2


def test_a_reply_cut_short_is_resumed_and_shown_once(fake: FakeServer) -> None:
    """The connection breaks after the first two pieces of the first reply: the chat (the
    library) sends the turn again with its request id and shows the rest; every line is
    shown once, and every turn had an id of its own."""
    fake.service.cut_replies = [2]
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "chat", "--target", fake.target(), "--model",
         "fake"],
        input="hello there\nand you\n", cwd=ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "you said: hello there\nyou said: and you\n"
    ids = fake.service.ids("Generate")
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Durable]:
    """A server on a directory store, behind a relay, to kill and start again."""
    server = Durable(tmp_path_factory, f"dir:{tmp_path_factory.mktemp('store')}", None)
    yield server
    server.stop()


def test_a_reply_cut_by_a_restart_is_resumed_and_shown_once(durable: Durable) -> None:
    """The server is killed with SIGKILL while the first reply streams and started again on
    its store (behind the relay, where the chat's target stays; while no server is there,
    connections are refused, so attempts fail at once, many more than the library's default
    four): the chat (the library) sends the line again with its request id, for as long as
    its --timeout allows, and shows the rest of the reply. What it prints is, byte for
    byte, what a chat never cut prints for the same lines with the same --seed: each reply
    once, on its own line."""
    command = [sys.executable, "-m", "memserve", "chat", "--target", durable.relay.target,
               "--model", TINY, "--max-tokens", "200", "--seed", "3", "--timeout",
               "600"]  # fmt: skip
    lines = ["tell me a long story", "and another one"]
    with Watched(command) as chat:
        chat.send(lines[0])
        chat.wait_for(lambda: bool(chat.text()))  # the reply streams
        shown = chat.text()
        durable.restart(None, refuse=True)
        chat.send(lines[1])
        assert chat.finish(600) == 0, chat.text("stderr")
        resumed, stderr = chat.text(), chat.text("stderr")
    assert stderr == ""
    first = resumed.split("\n")[0]
    assert first.startswith(shown) and len(shown) < len(first)  # cut, and shown to its end
    whole = subprocess.run(
        command, input="".join(f"{line}\n" for line in lines), cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    assert resumed == whole.stdout and resumed.count("\n") == 2


def chat_parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="memserve").add_subparsers()
    add_chat_parser(commands)
    parser: argparse.ArgumentParser = commands.choices["chat"]
    return parser


def test_help_and_docs_name_every_option_with_its_true_default() -> None:
    parser = chat_parser()
    help_text = " ".join(parser.format_help().split())
    options = [action for action in parser._actions if action.option_strings]
    for action in options:
        assert all(option in help_text for option in action.option_strings)
    # The table in docs/clients.md has every option, with the default a run gets, and the
    # help shows that same default.
    docs = (ROOT / "docs" / "clients.md").read_text()
    table = dict(re.findall(r"^  \| `(--[\w-]+)[^|]*\| ([^|]+?) \|", docs, flags=re.MULTILINE))
    for action in options:
        name = action.option_strings[-1]
        if name == "--help":
            continue
        assert name in table or name == "--key", f"{name} is not in docs/clients.md"
        if action.default not in (None, False) and name in table:
            assert table[name] == str(action.default), name
            assert f"(default: {table[name]})" in " ".join(str(action.help).split()), name
    # And its table of commands is the chat's.
    commands = re.findall(r"^\| `(/\w+)[^|]*\| [^|]+ \|$", docs, flags=re.MULTILINE)
    assert sorted(commands) == sorted(name.split()[0] for name in COMMANDS)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--top-p", "1.5"], "a number in (0, 1]"),
        (["--top-p", "0"], "a number in (0, 1]"),
        (["--temperature", "-1"], "a number >= 0"),
        (["--top-k", "-1"], "an integer >= 0"),
        (["--max-tokens", "many"], "an integer >= 0"),
        (["--timeout", "0"], "a number > 0"),
    ],
)
def test_bad_option_values_are_argparse_errors(
    arguments: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["chat", *arguments])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_chat_is_a_memserve_command() -> None:
    args = build_parser().parse_args(["chat", "--top-k", "5"])
    assert args.handler is run_chat and args.top_k == 5 and args.model == "vmed-chat"
    # Building the parser (every `memserve` run) loads neither grpc nor numpy.
    code = "import sys; from memserve.cli import build_parser; build_parser(); "
    code += "print(sorted({'grpc', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
