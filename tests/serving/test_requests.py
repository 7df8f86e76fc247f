"""The request log keeps the answers of a session's last `keep` calls with request ids, and
every call still running, whatever the order calls begin, answer and fail in."""

from __future__ import annotations

import random

from protos import journal_pb2
from serving.requests import RequestLog


def kept_by_rule(events: list[tuple[str, str]], keep: int) -> list[str]:
    """The ids the rule keeps, replayed plainly: every id begun and not failed, less the
    oldest answered ones beyond `keep`."""
    order: list[str] = []
    answered: set[str] = set()
    for kind, request_id in events:
        if kind == "begin":
            order.append(request_id)
        elif kind == "fail":
            order.remove(request_id)
        else:
            answered.add(request_id)
            done = [key for key in order if key in answered]
            for key in done[: max(0, len(done) - keep)]:
                order.remove(key)
    return order


def test_the_log_keeps_the_last_answers_and_every_call_still_running() -> None:
    rng = random.Random(5)
    for keep in (1, 2, 5):
        log, count = RequestLog(keep), 0
        events: list[tuple[str, str]] = []
        running: list[str] = []
        for _ in range(400):
            roll = rng.random()
            if roll < 0.45 or not running:
                request_id = f"r{count}"
                count += 1
                log.begin(request_id, b"digest")
                running.append(request_id)
                events.append(("begin", request_id))
            else:
                request_id = running.pop(rng.randrange(len(running)))
                if roll < 0.9:
                    log.finish(request_id, journal_pb2.Response(request_id=request_id))
                    events.append(("finish", request_id))
                else:
                    log.fail(request_id, RuntimeError("failed"))
                    events.append(("fail", request_id))
            assert list(log.entries) == kept_by_rule(events, keep)
            assert [r.request_id for r in log.answered()] == [
                key for key in log.entries if log.entries[key].response is not None
            ]
        assert len(log.answered()) <= keep


def test_answers_loaded_from_the_store_count_toward_the_bound() -> None:
    log = RequestLog(keep=3)
    log.load(journal_pb2.Response(request_id=f"old{i}") for i in range(5))
    assert list(log.entries) == ["old2", "old3", "old4"]
    log.begin("new", b"digest")
    log.finish("new", journal_pb2.Response(request_id="new"))
    assert list(log.entries) == ["old3", "old4", "new"]
