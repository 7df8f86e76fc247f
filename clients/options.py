"""What `memserve chat` and `memserve loadgen` share on the command line: the default server,
argparse types that check a value's range (a bad value is an argparse error, exit 2), and
the connection options (TLS, bearer token).

No grpc here: `memserve --help` imports this module. The library's TLS settings load only
when `tls_settings` runs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.channel import TLS

DEFAULT_TARGET = "127.0.0.1:50051"  # `memserve serve`'s default address
TOKEN_ENV = "MEMSERVE_TOKEN"


def _number(
    kind: Callable[[str], Any], what: str, check: Callable[[Any], bool]
) -> Callable[[str], Any]:
    """An argparse `type`: `kind(text)` if `check` holds, else an argparse error naming `what`."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a number > 0", lambda v: v > 0 and v != float("inf"))
nonnegative_float = _number(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
nonempty = _number(str, "a non-empty text", lambda v: v != "")


def add_connection_options(group: argparse._ActionsContainer) -> None:
    """--tls, --ca, --cert, --key, --server-name and --token (see `tls_settings`, `token`)."""
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by the four options below)"
    )
    group.add_argument(
        "--ca", metavar="FILE", help="PEM root certificates (default: gRPC's default roots)"
    )
    group.add_argument("--cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    group.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate carries, if not the target's host",
    )
    group.add_argument(
        "--token",
        help=f"bearer token sent with every call (default: ${TOKEN_ENV} if set)",
    )


def uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.ca or args.cert or args.key or args.server_name)


def tls_settings(args: argparse.Namespace) -> TLS | None:
    """The connection options as the library's TLS settings; None for plaintext. ValueError
    for --cert without --key (or the other way), OSError if a file cannot be read."""
    from clients.channel import TLS

    if not uses_tls(args):
        return None
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    return TLS.from_files(args.ca, args.cert, args.key, args.server_name)


def token(args: argparse.Namespace) -> str | None:
    """--token, else $MEMSERVE_TOKEN, else None."""
    value: str | None = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    return value
