"""The sequence-name map as a plain object: keys per (tenant, model, id), the newest START
wins, names learned back from creation request ids, ended names pruned."""

from __future__ import annotations

from serving.requests import MAX_REQUEST_ID
from serving.sequences import Sequences, creation_request_id, key_of, sequence_key


def test_keys_tell_tenants_models_and_id_kinds_apart() -> None:
    keys = {
        sequence_key("", "ntm-copy", 1), sequence_key("", "ntm-copy", "1"),
        sequence_key("", "dnc-recall", 1), sequence_key("acme", "ntm-copy", 1),
    }  # fmt: skip
    assert len(keys) == 4
    assert sequence_key("", "ntm-copy", 1) == sequence_key("", "ntm-copy", 1)


def test_a_creation_request_id_carries_its_key_and_fits() -> None:
    key = sequence_key("", "m", "x" * 10_000)
    made = creation_request_id(key, "r" * MAX_REQUEST_ID)
    assert key_of(made) == key and len(made) <= MAX_REQUEST_ID
    assert creation_request_id(key, "r1") == creation_request_id(key, "r1")  # a retry
    assert creation_request_id(key, "") != creation_request_id(key, "")  # random
    assert key_of("a-client-request") is None and key_of("kserve-seq:short:1") is None


def test_the_newest_start_wins_and_reports_what_it_replaced() -> None:
    names = Sequences()
    assert names.bind("k", "s1", made=1.0) is None
    assert names.bind("k", "s2", made=2.0) == "s1"
    assert names.bind("k", "s2", made=2.0) is None  # a retried START: the same session
    assert names.bind("k", "s0", made=0.5) is None and names.find("k") == "s2"  # older: kept


def test_names_come_back_from_the_store() -> None:
    names = Sequences()
    key = sequence_key("", "ntm-copy", 7)
    assert names.adopt(creation_request_id(key, ""), "old", made=1.0)
    assert names.adopt(creation_request_id(key, ""), "new", made=2.0)
    assert not names.adopt("a-v1-create", "v1", made=3.0)
    assert names.find(key) == "new" and len(names) == 1


def test_names_of_ended_sessions_are_pruned_once_many() -> None:
    names = Sequences(prune_above=4)
    for index in range(5):
        names.bind(f"k{index}", f"s{index}", made=float(index))
    names.prune(lambda session_id: session_id == "s4")
    assert len(names) == 1 and names.find("k4") == "s4"
    names.prune(lambda session_id: False)  # below the threshold: nothing happens
    assert len(names) == 1
