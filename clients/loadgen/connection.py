"""The load generator's connection to the server: its channels (plain or TLS, round robin),
the metadata of every call, the model it asks about (ListModels, or the v2 API's
ModelMetadata), and `LoadgenError` for a run that cannot start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from clients.channel import ChannelOption, Metadata, call_metadata, channel_options
from clients.loadgen import kserve
from clients.loadgen.recording import OK, CallCounts
from clients.loadgen.settings import Settings
from clients.messages import DIALOGUE_TYPES
from protos import memserve_pb2, memserve_pb2_grpc

if TYPE_CHECKING:
    from clients.channel import TLS


class LoadgenError(Exception):
    """The run cannot start (the server is unreachable, the model unknown, ...)."""


def code_name(error: grpc.aio.AioRpcError) -> str:
    return str(error.code().name)


class Connection:
    """Channels to the server (sessions use them round robin), the metadata of every call
    (the bearer token) and the sequence numbers of its sessions. `options` are the
    channels' options, whole."""

    def __init__(
        self,
        target: str,
        channels: int,
        options: Sequence[ChannelOption] = (),
        tls: TLS | None = None,
        token: str | None = None,
        protocol: str = "memserve",
    ) -> None:
        self.target = target
        self.protocol = protocol
        self.metadata: Metadata = call_metadata(token)
        if tls is None:
            self.channels = [grpc.aio.insecure_channel(target, options=list(options)) for _ in
                             range(channels)]  # fmt: skip
        else:
            credentials = tls.credentials()
            self.channels = [grpc.aio.secure_channel(target, credentials, list(options)) for _
                             in range(channels)]  # fmt: skip
        self.stubs: list[Any] = [
            memserve_pb2_grpc.MemServeStub(channel)  # type: ignore[no-untyped-call]
            for channel in self.channels
        ]
        if protocol == "kserve":  # the v2 inference API's stubs instead (clients/loadgen/kserve)
            self.stubs = [kserve.inference_stub(channel) for channel in self.channels]
        self.sessions = 0

    @classmethod
    def of(cls, settings: Settings) -> Connection:
        """The load generator's connection: straight to the server, one TCP connection per
        channel."""
        options = channel_options(settings.tls, [
            ("grpc.enable_http_proxy", 0),  # measure the server, not a proxy
            ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
        ])  # fmt: skip
        return cls(settings.target, settings.channels, options, settings.tls, settings.token,
                   settings.protocol)  # fmt: skip

    def next_session(self) -> tuple[int, Any]:
        """The next session's sequence number and the stub it talks over."""
        sequence = self.sessions
        self.sessions += 1
        return sequence, self.stubs[sequence % len(self.stubs)]

    async def connect(self, timeout: float) -> None:
        """Wait for every channel to be ready; LoadgenError after `timeout` seconds."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in self.channels)), timeout
            )
        except asyncio.TimeoutError:
            raise LoadgenError(
                f"cannot reach a server at {self.target} within {timeout:g} s (is "
                "`memserve serve` running there? see --target and --connect-timeout)"
            ) from None

    async def model_info(self, settings: Settings, calls: CallCounts) -> memserve_pb2.ModelInfo:
        """The workload's model as ListModels describes it; LoadgenError if it is not there
        or cannot do the workload."""
        if self.protocol == "kserve":
            return await self.kserve_model_info(settings, calls)
        try:
            answer = await self.stubs[0].ListModels(
                memserve_pb2.ListModelsRequest(), timeout=settings.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            calls.add("ListModels", code_name(error), error.details() or "")
            raise LoadgenError(
                f"ListModels at {self.target} failed: {code_name(error)}: {error.details()}"
            ) from None
        calls.add("ListModels", OK)
        models: dict[str, memserve_pb2.ModelInfo] = {m.name: m for m in answer.models}
        info = models.get(settings.model)
        if info is None:
            raise LoadgenError(
                f"no model {settings.model!r} on the server at {self.target} (it serves: "
                f"{', '.join(models) or 'nothing'}); see --model"
            )
        if settings.workload == "chat" and info.type not in DIALOGUE_TYPES:
            raise LoadgenError(
                f"model {settings.model!r} ({info.type}) does not generate text; the chat "
                f"workload needs a dialogue model ({', '.join(DIALOGUE_TYPES)}), e.g. vmed-chat"
            )
        return info

    async def kserve_model_info(
        self, settings: Settings, calls: CallCounts
    ) -> memserve_pb2.ModelInfo:
        """As `model_info`, from the v2 API's ModelMetadata."""
        try:
            info: memserve_pb2.ModelInfo = await kserve.model_info(
                self.stubs[0], settings.model, settings.timeout, self.metadata
            )
        except grpc.aio.AioRpcError as error:
            calls.add("ModelMetadata", code_name(error), error.details() or "")
            raise LoadgenError(
                f"ModelMetadata of {settings.model!r} at {self.target} failed: "
                f"{code_name(error)}: {error.details()}"
            ) from None
        calls.add("ModelMetadata", OK)
        if settings.workload == "chat" and info.type not in DIALOGUE_TYPES:
            raise LoadgenError(f"model {settings.model!r} ({info.type}) does not generate text")
        return info

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))
