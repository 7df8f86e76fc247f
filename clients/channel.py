"""How a client reaches the server: the channel's options, TLS credentials and the metadata
sent with every call (the bearer token). Shared by `Client` and `AsyncClient`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# As large as the server accepts (serving/server.py): exported states can be big.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

ChannelOption = tuple[str, Any]
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class TLS:
    """TLS settings, PEM bytes. Without `root_certificates` the server's certificate is
    checked against gRPC's default roots; `certificate_chain` and `private_key` (both or
    neither) authenticate the client (mutual TLS); `server_name` is the name the server's
    certificate must carry when it is not the host of the target (e.g. an IP address)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        """TLS settings read from PEM files (OSError if one cannot be read)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(
            root_certificates=read(root_certificates),
            certificate_chain=read(certificate_chain),
            private_key=read(private_key),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def resolve_tls(tls: bool | TLS | None) -> TLS | None:
    """`tls=True` means TLS with the default roots; False or None, a plaintext channel."""
    if tls is True:
        return TLS()
    return tls or None


def channel_options(tls: TLS | None, extra: Sequence[ChannelOption]) -> list[ChannelOption]:
    """The options every client channel gets, then the caller's (which win)."""
    options: list[ChannelOption] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options + list(extra)


# Every call naming a session carries its id in this header: an edge in front of several
# servers (`memserve cluster`'s Envoy, docs/cluster.md) routes the session's calls by it.
SESSION_HEADER = "x-memserve-session"


def with_session(metadata: Metadata, request: Any) -> Metadata:
    """`metadata`, plus the session header when `request` names a session."""
    session_id = getattr(request, "session_id", "") if not isinstance(request, str) else request
    return (*metadata, (SESSION_HEADER, session_id)) if session_id else metadata


def call_metadata(token: str | None) -> Metadata:
    """Metadata sent with every call: `authorization: Bearer <token>` when there is one."""
    return () if not token else (("authorization", f"Bearer {token}"),)
