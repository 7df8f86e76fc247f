"""`memserve loadgen --protocol kserve`: the same workloads through the v2 inference API
(`inference.GRPCInferenceService`, KServe v2 with Triton's sequence extension), as a Triton
client drives a stateful model: a session is a sequence, named by the load generator; its
first request carries `sequence_start`, its K-th `sequence_end`. `step` is ModelInfer with
an FP32 `INPUT [T, input_size]`; `chat` is one ModelStreamInfer per turn, read to its final
response (`triton_final_response`). A sequence cut short at the end of a level is ended
with one more request (counted). docs/kserve.md has the mapping.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import grpc
import numpy as np

from clients.channel import Metadata
from clients.loadgen.recording import INVALID_RESPONSE, OK, Outcome
from clients.loadgen.schedule import Session, now
from clients.loadgen.settings import Settings
from clients.loadgen.workloads import Workload
from protos import memserve_pb2
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc

FINAL = "triton_final_response"
STATUS = re.compile(r"^\[StatusCode\.([A-Z_]+)\] ")  # how memserve's stream errors begin


def inference_stub(channel: grpc.aio.Channel) -> Any:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


async def model_info(stub: Any, model: str, timeout: float, metadata: Metadata) -> Any:
    """ModelMetadata as the ListModels entry the workloads read (name, type, sizes)."""
    answer = await stub.ModelMetadata(
        v2.ModelMetadataRequest(name=model), timeout=timeout, metadata=metadata
    )
    sizes = {t.name: list(t.shape) for t in (*answer.inputs, *answer.outputs)}
    return memserve_pb2.ModelInfo(
        name=answer.name,
        type=answer.platform.removeprefix("memserve_"),
        input_size=sizes.get("INPUT", [0, 0])[-1],
        output_size=sizes.get("OUTPUT", [0, 0])[-1],
    )


class Sequences(Workload):
    """What both v2 workloads share: sessions are sequences the workload names and ends."""

    sequences = True  # GrpcTarget: no CreateSession or DeleteSession

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run = secrets.token_hex(4)  # names unique to this run

    def name(self, sequence: int) -> str:
        return f"loadgen-{self.run}-{sequence}"

    def request(self, session: Session, used: int | None = None) -> Any:
        used = session.used if used is None else used
        request = v2.ModelInferRequest(model_name=self.settings.model)
        parameters = request.parameters
        parameters["sequence_id"].string_param = session.session_id
        parameters["sequence_start"].bool_param = used == 0
        parameters["sequence_end"].bool_param = used == self.settings.requests_per_session - 1
        return request

    def unfinished(self, session: Session) -> bool:
        return not session.gone and 0 < session.used < self.settings.requests_per_session


class KServeStep(Sequences):
    """The step workload as ModelInfer calls (the same inputs as memserve.v1's)."""

    method = "ModelInfer"

    def __init__(self, settings: Settings, info: Any) -> None:
        super().__init__(settings)
        rng = np.random.default_rng(settings.seed)
        self.shape = [settings.steps_per_call, int(info.input_size)]
        self.inputs = [rng.random(self.shape, dtype=np.float32).tobytes() for _ in range(64)]
        self.output_bytes = settings.steps_per_call * int(info.output_size) * 4

    def infer_request(self, session: Session, used: int | None = None) -> Any:
        request = self.request(session, used)
        index = (session.sequence * self.settings.steps + session.used) % len(self.inputs)
        request.inputs.add(name="INPUT", datatype="FP32", shape=self.shape)
        request.raw_input_contents.append(self.inputs[index])
        return request

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        try:
            response = await session.stub.ModelInfer(
                self.infer_request(session), timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError:
            session.gone = session.used == 0  # no sequence was started
            raise
        done = now()
        raw = response.raw_output_contents
        if not raw or len(raw[0]) != self.output_bytes:
            got = len(raw[0]) if raw else 0
            return Outcome(
                INVALID_RESPONSE, done, f"OUTPUT of {got} bytes, not {self.output_bytes}"
            )
        return Outcome(OK, done, steps=self.settings.steps_per_call)

    async def end(self, session: Session, timeout: float | None, metadata: Metadata) -> None:
        """End a sequence cut short: one more request, with sequence_end."""
        request = self.infer_request(session, self.settings.requests_per_session - 1)
        await session.stub.ModelInfer(request, timeout=timeout, metadata=metadata)


class KServeChat(Sequences):
    """The chat workload: each turn one ModelStreamInfer, a response per piece."""

    method = "ModelStreamInfer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        order = np.random.default_rng(settings.seed).permutation(len(settings.prompts))
        self.prompts = [settings.prompts[i] for i in order]

    def turn_request(self, session: Session, used: int | None = None) -> Any:
        settings = self.settings
        request = self.request(session, used)
        index = (session.sequence * settings.turns + session.used) % len(self.prompts)
        text = self.prompts[index].encode()
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(text).to_bytes(4, "little") + text)
        parameters = request.parameters
        parameters["max_tokens"].int64_param = settings.max_tokens
        parameters["seed"].int64_param = (
            settings.seed + session.sequence * settings.turns + (session.used)
        )
        if settings.top_k:
            parameters["top_k"].int64_param = settings.top_k
        if settings.temperature is not None:
            parameters["temperature"].double_param = settings.temperature
        if settings.top_p is not None:
            parameters["top_p"].double_param = settings.top_p
        return request

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        request = self.turn_request(session)
        try:
            return await self.read(session.stub.ModelStreamInfer(iter((request,)), timeout=timeout,
                                                                metadata=metadata))  # fmt: skip
        except grpc.aio.AioRpcError:
            session.gone = session.used == 0
            raise

    async def read(self, stream: Any) -> Outcome:
        pieces: list[float] = []
        async for message in stream:
            moment = now()
            if message.error_message:
                code = STATUS.match(message.error_message)
                return Outcome(code.group(1) if code else "UNKNOWN", moment, message.error_message)
            parameters = message.infer_response.parameters
            if parameters[FINAL].bool_param:
                return Outcome(
                    OK, moment, pieces=pieces,
                    completion_tokens=parameters["completion_tokens"].int64_param,
                    prompt_tokens=parameters["prompt_tokens"].int64_param,
                    finish_reason=parameters["finish_reason"].string_param or "?",
                )  # fmt: skip
            pieces.append(moment)
        return Outcome(INVALID_RESPONSE, now(), "the stream ended without a final response")

    async def end(self, session: Session, timeout: float | None, metadata: Metadata) -> None:
        request = self.turn_request(session, self.settings.requests_per_session - 1)
        await self.read(session.stub.ModelStreamInfer(iter((request,)), timeout=timeout,
                                                      metadata=metadata))  # fmt: skip
