"""Generate over a real server with a small VMED: streamed replies equal the same turns run
in process, seeds reproduce, conversations stay apart, the state does not grow, a
cancelled call leaves the session usable, and every bad request is refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from bench.child_server import ServerProcess
from models.tokenizer import EOS
from models.tokenizer import decode as decode_tokens
from models.tokenizer import encode as encode_tokens
from models.vmed import VMED
from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving.export import export_state, import_state
from tests.serving.client import create, info, metric, scrape
from tests.tiny_vmed import tiny_vmed as make_tiny_vmed

MODEL = "vmed-tiny"
LIMIT = 24  # --max-new-tokens of the test server


@pytest.fixture(scope="module")
def tiny_vmed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VMED]:
    """The small VMED of tests/tiny_vmed.py, saved as a checkpoint named MODEL."""
    return make_tiny_vmed(tmp_path_factory.mktemp("model") / MODEL)


@pytest.fixture(scope="module")
def chat_server(
    tiny_vmed: tuple[Path, VMED], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    directory, _ = tiny_vmed
    with ServerProcess(
        tmp_path_factory.mktemp("server"), "--models", f"{directory},ntm-copy",
        "--max-new-tokens", str(LIMIT), "--max-steps-per-call", "64",
    ) as process:  # fmt: skip
        yield process


def generate(
    stub: MemServeStub, session_id: str, text: str, **fields: Any
) -> tuple[list[str], memserve_pb2.GenerateDone]:
    """The streamed pieces and the final message of one Generate call."""
    pieces, done = [], None
    request = memserve_pb2.GenerateRequest(session_id=session_id, text=text, **fields)
    for message in stub.Generate(request):
        if message.HasField("done"):
            done = message.done
        else:
            assert done is None, "a piece after the final message"
            pieces.append(message.text)
    assert done is not None
    return pieces, done


class Conversation:
    """The same turns in process: greedy replies, z drawn as the server draws it; with a
    presence penalty, greedy after taking it off the logits of every token this reference
    saw the model given in the conversation."""

    def __init__(self, model: VMED, presence_penalty: float = 0.0) -> None:
        self.model = model
        self.pool = model.new_pool(1)
        model.reset(self.pool, [0])
        self.slots = torch.zeros(1, dtype=torch.int64)
        self.presence_penalty = presence_penalty
        self.said: set[int] = set()

    def _write(self, tokens: list[int]) -> None:
        for token in tokens:
            self.model.encode(self.pool, self.slots, torch.tensor([token]))

    def turn(self, text: str, seed: int, max_tokens: int) -> str:
        tokenizer = self.model.tokenizer
        assert tokenizer is not None
        self._write([*encode_tokens(tokenizer, text), EOS])
        rng = np.random.default_rng(seed)
        noise = torch.from_numpy(rng.standard_normal((1, self.model.config.latent_size)))
        uniform = torch.tensor([rng.random()])
        self.model.begin_reply(self.pool, self.slots, noise.float(), uniform.float())
        generated: list[int] = []
        previous = 1  # <bos>
        while len(generated) < max_tokens:
            logits = self.model.decode(self.pool, self.slots, torch.tensor([previous]))[0]
            if previous != 1:
                self.said.add(previous)
            logits[sorted(self.said)] -= self.presence_penalty
            previous = int(logits.argmax())
            if previous == EOS:
                break
            generated.append(previous)
        reply = decode_tokens(tokenizer, generated).strip()
        self._write([*encode_tokens(tokenizer, reply), EOS])
        return reply


TURNS = ["hi ! how are you doing tonight ?", "i like to work on vintage cars .",
         "do you have any pets ?"]  # fmt: skip


def test_streamed_replies_match_the_same_turns_in_process(
    chat_server: ServerProcess, tiny_vmed: tuple[Path, VMED], reference_backend: None
) -> None:
    stub = chat_server.stub()
    session_id = create(stub, MODEL)
    reference = Conversation(tiny_vmed[1])
    for index, text in enumerate(TURNS):
        pieces, done = generate(stub, session_id, text, temperature=0.0, max_tokens=12,
                                seed=index)  # fmt: skip
        assert done.text == reference.turn(text, seed=index, max_tokens=12)
        assert "".join(pieces).strip() == done.text and len(pieces) >= 2
        assert done.finish_reason == "length" and done.completion_tokens == 12
        assert done.prompt_tokens == len(encode_tokens(tiny_vmed[1].tokenizer, text)) + 1  # type: ignore[arg-type]
    samples = scrape(chat_server.metrics_url)
    assert metric(samples, "memserve_time_to_first_token_seconds_count", model=MODEL) >= 3
    assert metric(samples, "memserve_generated_tokens_total", model=MODEL) >= 36


def test_a_presence_penalty_over_the_conversation_matches_the_same_turns_in_process(
    chat_server: ServerProcess, tiny_vmed: tuple[Path, VMED], reference_backend: None
) -> None:
    """Greedy replies with presence_penalty equal the in-process reference that penalises
    what it saw the model say in every turn so far, and differ from those without it."""
    stub = chat_server.stub()
    replies: dict[float, list[str]] = {}
    for penalty in (0.0, 3.0):
        session_id = create(stub, MODEL)
        reference = Conversation(tiny_vmed[1], presence_penalty=penalty)
        replies[penalty] = []
        for index, text in enumerate(TURNS):
            _, done = generate(stub, session_id, text, temperature=0.0, max_tokens=12,
                               seed=index, presence_penalty=penalty)  # fmt: skip
            assert done.text == reference.turn(text, seed=index, max_tokens=12)
            replies[penalty].append(done.text)
    assert replies[3.0] != replies[0.0]


def test_same_seed_and_history_give_the_same_text(chat_server: ServerProcess) -> None:
    stub = chat_server.stub()
    replies = []
    for seed in (11, 11, 12):
        session_id = create(stub, MODEL)
        turns = [generate(stub, session_id, text, seed=seed, temperature=1.0, top_k=50,
                          top_p=0.9, max_tokens=10)[1].text for text in TURNS[:2]]  # fmt: skip
        replies.append(turns)
    assert replies[0] == replies[1]
    assert replies[0] != replies[2]


def test_stop_string_ends_the_reply_before_it(chat_server: ServerProcess) -> None:
    stub = chat_server.stub()
    first = generate(stub, create(stub, MODEL), TURNS[0], temperature=0.0, seed=3,
                     max_tokens=12)[1].text  # fmt: skip
    stop = first.split()[len(first.split()) // 2]
    pieces, done = generate(stub, create(stub, MODEL), TURNS[0], temperature=0.0, seed=3,
                            max_tokens=12, stop=[stop])  # fmt: skip
    assert done.finish_reason == "stop"
    assert done.text == first[: first.index(stop)].strip()
    assert stop not in "".join(pieces)


def test_concurrent_conversations_do_not_leak(
    chat_server: ServerProcess, tiny_vmed: tuple[Path, VMED], reference_backend: None
) -> None:
    stub = chat_server.stub()
    conversations = {
        "a": (create(stub, MODEL), TURNS, Conversation(tiny_vmed[1])),
        "b": (create(stub, MODEL), TURNS[::-1], Conversation(tiny_vmed[1])),
    }
    served: dict[str, list[str]] = {}

    def talk(name: str) -> None:
        session_id, texts, _ = conversations[name]
        served[name] = [generate(stub, session_id, text, temperature=0.0, seed=5,
                                 max_tokens=8)[1].text for text in texts]  # fmt: skip

    threads = [threading.Thread(target=talk, args=(name,)) for name in conversations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for name, (_, texts, reference) in conversations.items():
        assert served[name] == [reference.turn(text, seed=5, max_tokens=8) for text in texts]


def test_twenty_turns_leave_the_state_size_unchanged(chat_server: ServerProcess) -> None:
    stub = chat_server.stub()
    session_id = create(stub, MODEL)
    sizes = []
    for turn in range(20):
        generate(stub, session_id, TURNS[turn % 3], max_tokens=4, seed=turn)
        exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
        sizes.append(len(exported.state))
    assert len(set(sizes)) == 1
    assert info(stub, session_id).step > 20 * 10


def test_a_cancelled_turn_is_undone_and_the_session_goes_on(chat_server: ServerProcess) -> None:
    stub = chat_server.stub()
    session_id = create(stub, MODEL)
    call = stub.Generate(memserve_pb2.GenerateRequest(session_id=session_id, text=TURNS[0],
                                                      max_tokens=LIMIT))  # fmt: skip
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:
        for _ in call:
            pass
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    # A session's calls run in order: the next Generate starts once the cancelled turn has
    # stopped, and a turn is all or nothing (docs/serving.md): the session went back to its
    # state from before it, so the next turn answers as on a fresh session, to the token.
    pieces, done = generate(stub, session_id, TURNS[1], max_tokens=5, seed=7)
    fresh_pieces, fresh = generate(stub, create(stub, MODEL), TURNS[1], max_tokens=5, seed=7)
    assert (pieces, done.text, done.step) == (fresh_pieces, fresh.text, fresh.step)
    assert done.completion_tokens == 5 and done.step > 0
    assert info(stub, session_id).step == done.step  # and the cancelled turn never went on


def invalid_utf8_request(session_id: str) -> bytes:
    """A GenerateRequest whose text (field 2) is not UTF-8, as raw protobuf bytes."""
    good: bytes = memserve_pb2.GenerateRequest(session_id=session_id).SerializeToString()
    return good + b"\x12\x02\xff\xfe"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"text": ""}, "text is empty"),
        ({"text": "   "}, "text is empty"),
        ({"text": "hello " * 2000}, "characters"),
        ({"text": "hello " * 70}, "tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": LIMIT + 1}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": -0.5}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"raw": True}, "UTF-8"),
    ],
)
def test_bad_generate_request_is_refused_and_changes_nothing(
    chat_server: ServerProcess, fields: dict[str, object], words: str
) -> None:
    stub = chat_server.stub()
    session_id = create(stub, MODEL)
    generate(stub, session_id, TURNS[0], max_tokens=3)
    before = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
    with pytest.raises(grpc.RpcError) as refused:
        if fields.get("raw"):
            method = chat_server.channel().unary_stream(
                "/memserve.v1.MemServe/Generate",
                request_serializer=lambda data: data,
                response_deserializer=memserve_pb2.GenerateResponse.FromString,
            )
            list(method(invalid_utf8_request(session_id)))
        else:
            request = {"text": TURNS[1], **fields}
            generate(stub, session_id, **request)  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert words in refused.value.details()
    after = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
    assert after.step == before.step
    before_tensors, after_tensors = (import_state(e.state).tensors for e in (before, after))
    assert all(torch.equal(before_tensors[n], after_tensors[n]) for n in before_tensors)


def test_generate_on_a_model_without_text_is_refused(chat_server: ServerProcess) -> None:
    stub = chat_server.stub()
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, create(stub, "ntm-copy"), "hello")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not generate text" in refused.value.details()


def test_an_export_from_before_the_said_record_still_imports(
    chat_server: ServerProcess, tiny_vmed: tuple[Path, VMED], reference_backend: None
) -> None:
    """A session exported before VMED states held `said` imports with an empty record and
    replies as the same conversation in process does, whose record starts empty there too;
    an export that lacks any other tensor is still refused."""
    stub = chat_server.stub()
    session_id = create(stub, MODEL)
    generate(stub, session_id, TURNS[0], temperature=0.0, max_tokens=6, seed=0)
    exported = import_state(
        stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id)).state
    )
    assert bool(exported.tensors["said"].any())
    older = {name: t for name, t in exported.tensors.items() if name != "said"}
    data = export_state(older, exported.model, exported.model_digest, exported.step)
    imported = stub.ImportSession(memserve_pb2.ImportSessionRequest(state=data))
    again = import_state(
        stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=imported.session_id)).state
    )
    assert not bool(again.tensors["said"].any())
    assert all(torch.equal(again.tensors[n], t) for n, t in older.items())
    # The in-process reference: the same state, an empty record, then a turn with a penalty.
    model = tiny_vmed[1]
    reference = Conversation(model, presence_penalty=3.0)
    model.reset(reference.pool, [0])
    reference.pool.write(0, {**older, "said": torch.zeros_like(exported.tensors["said"])})
    _, done = generate(stub, imported.session_id, TURNS[1], temperature=0.0, max_tokens=8,
                       seed=1, presence_penalty=3.0)  # fmt: skip
    assert done.text == reference.turn(TURNS[1], seed=1, max_tokens=8)
    broken = {name: t for name, t in exported.tensors.items() if name != "z"}
    with pytest.raises(grpc.RpcError) as refused:
        stub.ImportSession(memserve_pb2.ImportSessionRequest(
            state=export_state(broken, exported.model, exported.model_digest, exported.step)
        ))  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing ['z']" in refused.value.details()
