"""`memserve chat`: talk to a dialogue model (vmed-chat) on a server, in the terminal.

Each line is one utterance; the reply streams back as it is decoded. The conversation
lives in a session on the server (its memory), so slash commands can start over, fork,
save and load it. Replies go to stdout, notices and errors to stderr; with stdin piped
there is no prompt, one utterance per line, one reply per line.

Only argparse is imported here at `memserve --help` time; the client library (grpc, numpy)
loads when the chat starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from clients import options
from clients.options import (
    DEFAULT_TARGET,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    probability,
)

if TYPE_CHECKING:
    from clients.client import Client, Session
    from clients.errors import MemserveError

DEFAULT_MODEL = "vmed-chat"
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 0
DEFAULT_TOP_P = 0.9
DEFAULT_PRESENCE_PENALTY = 0.0
DEFAULT_MAX_TOKENS = 64
DEFAULT_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 10.0  # the most each deletion at the end may take (Ctrl-C cannot cut it)
# Once the chat has started, a call that fails in a way the library retries (UNAVAILABLE: the
# server restarting, its store down; an attempt past its time limit) is tried again until
# its deadline (--timeout), at most this long apart, not the library's default four times:
# a server restart takes seconds. At the start, a server that is not there is reported at
# once (the library's default policy).
RIDE_OUT_BACKOFF = 1.0

COMMANDS = {
    "/help": "list these commands",
    "/reset": "start a new conversation (a new session; the old one is deleted)",
    "/fork": "continue in a fork of this conversation (the original stays until the end)",
    "/save FILE": "write the conversation's state to FILE (ExportSession)",
    "/load FILE": "continue the conversation saved in FILE (ImportSession)",
    "/quit": "end the chat (so do Ctrl-D and Ctrl-C at the prompt)",
}

EXIT_OK = 0
EXIT_CANNOT_START = 1
EXIT_INTERRUPTED = 130  # the shell's code for "ended by SIGINT"


def add_chat_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `memserve chat`."""
    chat = commands.add_parser(
        "chat",
        help="talk to a dialogue model on a server, in the terminal",
        description=textwrap.fill(
            "Talk to a dialogue model served by 'memserve serve': each line you type is sent "
            "with Generate and the reply streams back; the conversation is a session on the "
            "server. Ctrl-C during a reply stops that reply; Ctrl-C or Ctrl-D at the prompt "
            "ends the chat. With stdin piped: one utterance per line, one reply per line on "
            "stdout, no prompt. Exit status: 0 at the end of the input or /quit, 1 if the "
            "chat cannot start (server unreachable, unknown model or one that does not "
            "generate text), 2 for bad options, 130 after Ctrl-C at the prompt.",
            width=79,
        ),
        epilog="commands during the chat:\n"
        + "\n".join(f"  {name:<12}{what}" for name, what in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=DEFAULT_TARGET,
        help=f"the server (default: {DEFAULT_TARGET})",
    )
    chat.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a dialogue model (default: {DEFAULT_MODEL})"
    )
    sampling = chat.add_argument_group("sampling")
    sampling.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"0 is greedy (default: {DEFAULT_TEMPERATURE})",
    )
    sampling.add_argument(
        "--top-k",
        type=nonnegative_int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"sample from the k most likely tokens; 0: all (default: {DEFAULT_TOP_K})",
    )
    sampling.add_argument(
        "--top-p",
        type=probability,
        default=DEFAULT_TOP_P,
        metavar="P",
        help=f"sample from the smallest set of tokens with this much mass (default: "
        f"{DEFAULT_TOP_P})",
    )
    sampling.add_argument(
        "--presence-penalty",
        type=nonnegative_float,
        default=DEFAULT_PRESENCE_PENALTY,
        metavar="P",
        help="taken off the logit of every token the model has said earlier in the "
        "conversation, so that it repeats itself less; with --temperature 0, 1 keeps "
        f"vmed-chat from repeating its replies (docs/models.md) (default: "
        f"{DEFAULT_PRESENCE_PENALTY})",
    )
    sampling.add_argument(
        "--max-tokens",
        type=nonnegative_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"most tokens in a reply; 0: the server's limit (default: {DEFAULT_MAX_TOKENS})",
    )
    sampling.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="sampling seed sent with every line: the same seed and the same lines give the "
        "same replies (default: a random one)",
    )
    connection = chat.add_argument_group("connection")
    connection.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each call, a whole reply included (default: {DEFAULT_TIMEOUT})",
    )
    options.add_connection_options(connection)
    chat.set_defaults(handler=run_chat)


def describe(error: MemserveError, target: str) -> str:
    """A failed call in a sentence, for a person."""
    import grpc

    if error.code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the server at {target} ({error.message})"
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the server did not answer in time (see --timeout)"
    return f"{error.message} ({error.code.name})"


def run_chat(args: argparse.Namespace) -> int:
    """The chat, until the input ends, /quit or Ctrl-C at the prompt; the exit status."""
    from clients.client import Client
    from clients.retry import RetryPolicy

    client = Client(
        args.target,
        timeout=args.timeout,
        tls=options.tls_settings(args),
        token=options.token(args),
    )
    try:
        with client:
            session = start(client, args)
            if isinstance(session, str):
                print(f"memserve chat: error: {session}", file=sys.stderr)
                return EXIT_CANNOT_START
            # Bounded by each call's deadline, not by a count (see RIDE_OUT_BACKOFF).
            client.retry = RetryPolicy(attempts=sys.maxsize, max_backoff=RIDE_OUT_BACKOFF)
            chat = Chat(client, session, args, sys.stdin, sys.stdout, sys.stderr)
            try:
                return chat.run()
            finally:
                chat.close()
    except KeyboardInterrupt:  # before the chat began
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def start(client: Client, args: argparse.Namespace) -> Session | str:
    """The chat's session, once ListModels shows a dialogue model; else why not."""
    from clients.errors import MemserveError
    from clients.messages import DIALOGUE_TYPES

    try:
        models = {model.name: model for model in client.list_models()}
        info = models.get(args.model)
        if info is None:
            return (
                f"no model {args.model!r} on the server at {args.target} (it serves: "
                f"{', '.join(models) or 'nothing'}); see --model"
            )
        if info.type not in DIALOGUE_TYPES:
            return (
                f"model {args.model!r} ({info.type}) does not generate text; the chat needs "
                f"a dialogue model ({', '.join(DIALOGUE_TYPES)}), e.g. {DEFAULT_MODEL}"
            )
        return client.session(args.model)
    except MemserveError as error:
        return describe(error, args.target)


class Chat:
    """One terminal conversation: reads lines, answers commands, streams replies."""

    def __init__(
        self,
        client: Client,
        session: Session,
        args: argparse.Namespace,
        stdin: TextIO,
        stdout: TextIO,
        stderr: TextIO,
    ) -> None:
        self.client = client
        self.session = session
        self.kept: list[Session] = []  # forked-from sessions, deleted at the end
        self.args = args
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()

    # ------------------------------------------------------------------ input and output

    def notice(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.stderr, flush=True)

    def read_line(self) -> str | None:
        """The next line typed or piped; None at the end of the input."""
        if not self.interactive:
            line = self.stdin.readline()
            return line if line else None
        try:
            return input("> ")
        except EOFError:
            print(file=self.stdout)
            return None

    def run(self) -> int:
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())

            self.notice(
                f"chatting with {self.session.model} on {self.args.target} (session "
                f"{self.session.id}); /help lists the commands, Ctrl-D ends the chat"
            )
        try:
            while True:
                line = self.read_line()
                if line is None:
                    return EXIT_OK
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if self.command(line) == "quit":
                        return EXIT_OK
                else:
                    self.reply(line)
        except KeyboardInterrupt:  # at the prompt (during a reply, Ctrl-C stops the reply)
            print(file=self.stdout, flush=True)
            return EXIT_INTERRUPTED

    # ------------------------------------------------------------------ replies

    def reply(self, text: str) -> None:
        """Send `text`; print the reply as it streams, then end its line (one line per turn,
        even a failed one). Ctrl-C stops the reply only."""
        from clients.errors import MemserveError

        if self.interactive:
            self.stdout.write(f"{self.session.model}: ")
        generation = self.session.generate(
            text,
            max_tokens=self.args.max_tokens,
            temperature=self.args.temperature,
            top_k=self.args.top_k,
            top_p=self.args.top_p,
            presence_penalty=self.args.presence_penalty,
            seed=self.args.seed,
        )
        printed = False
        failure: MemserveError | None = None
        previous = signal.signal(signal.SIGINT, lambda number, frame: generation.cancel())
        try:
            for piece in generation:
                self.stdout.write(piece if printed else piece.lstrip())
                self.stdout.flush()
                printed = True
        except MemserveError as error:
            failure = error
        finally:
            signal.signal(signal.SIGINT, previous)
        print(file=self.stdout, flush=True)
        if failure is not None:
            self.error(describe(failure, self.args.target) + self.hint(failure))
        elif generation.cancelled:
            self.notice("(reply stopped)")

    def hint(self, error: MemserveError) -> str:
        import grpc

        if error.code == grpc.StatusCode.NOT_FOUND:
            return "; /reset starts a new conversation"
        return ""

    # ------------------------------------------------------------------ commands

    def command(self, line: str) -> str | None:
        """Run one slash command; "quit" when the chat should end."""
        from clients.errors import MemserveError

        name, _, argument = line.partition(" ")
        argument = argument.strip()
        handlers = {
            "/help": self.help,
            "/reset": self.reset,
            "/fork": self.fork,
            "/save": self.save,
            "/load": self.load,
        }
        if name == "/quit":
            return "quit"
        handler = handlers.get(name)
        if handler is None:
            self.error(f"unknown command {name} (/help lists the commands)")
            return None
        needs_file = name in ("/save", "/load")
        if needs_file != bool(argument):
            self.error(f"usage: {name} FILE" if needs_file else f"{name} takes no argument")
            return None
        try:
            handler(argument)
        except MemserveError as error:
            self.error(f"{name}: {describe(error, self.args.target)}")
        except OSError as error:
            self.error(f"{name}: {error.strerror or error}: {argument}")
        return None

    def help(self, _: str) -> None:
        for name, what in COMMANDS.items():
            print(f"{name:<12}{what}", file=self.stdout)
        self.stdout.flush()

    def switch(self, session: Session, keep_old: bool = False) -> Session:
        """Continue in `session`; the old one is deleted (or kept until the end)."""
        old, self.session = self.session, session
        if keep_old:
            self.kept.append(old)
        else:
            self.delete(old)
        return old

    def reset(self, _: str) -> None:
        old = self.switch(self.client.session(self.session.model))
        self.notice(f"new conversation: session {self.session.id} (deleted {old.id})")

    def fork(self, _: str) -> None:
        old = self.switch(self.session.fork(), keep_old=True)
        self.notice(
            f"now in session {self.session.id}, a fork of {old.id} at step "
            f"{self.session.step_count} (kept until the chat ends)"
        )

    def save(self, path: str) -> None:
        state = self.session.export()
        Path(path).write_bytes(state)
        self.notice(
            f"saved session {self.session.id} (step {self.session.step_count}, "
            f"{len(state)} bytes) to {path}"
        )

    def load(self, path: str) -> None:
        from clients.client import Session

        state = Path(path).read_bytes()
        old = self.switch(Session(self.client, self.client.import_session(state)))
        self.notice(
            f"loaded {path}: session {self.session.id} ({self.session.model}, step "
            f"{self.session.step_count}); deleted {old.id}"
        )

    # ------------------------------------------------------------------ the end

    def delete(self, session: Session, timeout: float | None = None) -> None:
        from clients.errors import MemserveError

        try:
            session.delete(timeout=timeout)
        except MemserveError as error:
            self.notice(
                f"could not delete session {session.id}: {describe(error, self.args.target)}"
            )

    def close(self) -> None:
        """Delete every session this chat made, Ctrl-C or not."""
        timeout = min(self.args.timeout, CLEANUP_TIMEOUT)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for session in [*self.kept, self.session]:
                self.delete(session, timeout)
        finally:
            signal.signal(signal.SIGINT, previous)
