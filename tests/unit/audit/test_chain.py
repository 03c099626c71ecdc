"""Tests of gateway.audit.chain and gateway.audit.verify: the keyed hash chain, the seal and
the verifier (no I/O)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.audit.chain import (
    AUDIT_KEY_INFO,
    GENESIS_HASH,
    AuditChain,
    canonical_encoding,
    derive_audit_key,
    event_fields,
)
from gateway.audit.records import AuditEvent, Parameter
from gateway.audit.verify import ChainProblem, SessionVerifier, describe
from gateway.credentials.secretbox import SecretBox
from gateway.errors import ConfigError

MASTER = bytes(range(32))
KEY = derive_audit_key(MASTER)
SESSION = "a" * 32
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _statement(sql: str = "SELECT 1", **overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "session_id": SESSION,
        "connection_id": "c" * 32,
        "kind": "statement",
        "occurred_at": T0,
        "protocol": "extended",
        "sql": sql,
        "parameters": (
            Parameter(1, 23, "text", "42"),
            Parameter(2, 17, "binary", "AAE=", False),
            Parameter(3, None, "null", None),
            Parameter(10, 25, "text", "abc", True),
        ),
        "command_tag": "SELECT 1",
        "rows": 1,
        "status": "ok",
        "duration_ms": 1.5,
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def _chain_of(events: list[AuditEvent]) -> list[dict[str, Any]]:
    """Rows as the store would write them: id, seq, prev_hash, hash, fields."""
    chain = AuditChain(KEY)
    rows = []
    prev = GENESIS_HASH
    for seq, event in enumerate(events, 1):
        fields = event_fields(event)
        digest = chain.record_hash(prev, seq, fields)
        rows.append(
            {"row_id": seq * 10, "seq": seq, "prev_hash": prev, "hash": digest, "fields": fields}
        )
        prev = digest
    return rows


def _verify(
    rows: list[dict[str, Any]],
    *,
    ended: bool = False,
    seal: tuple[int, str] | None = None,
    seal_override: str | None = None,
) -> list[ChainProblem]:
    chain = AuditChain(KEY)
    verifier = SessionVerifier(chain, SESSION)
    for row in rows:
        verifier.feed(row["row_id"], row["seq"], row["prev_hash"], row["hash"], row["fields"])
    if seal is None:
        return verifier.finish(ended=ended, count=None, head=None, seal=None)
    count, head = seal
    value = seal_override if seal_override is not None else chain.seal(SESSION, count, head)
    return verifier.finish(ended=ended, count=count, head=head, seal=value)


def _problems(found: list[ChainProblem]) -> list[tuple[int | None, str]]:
    return [(p.seq, p.problem) for p in found]


# -- keys ------------------------------------------------------------------------------


def test_the_audit_key_is_hkdf_sha256_of_the_master_key() -> None:
    expected = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"pam audit chain v1"
    ).derive(MASTER)
    assert derive_audit_key(MASTER) == expected
    assert AUDIT_KEY_INFO == b"pam audit chain v1"


def test_secret_box_derives_the_same_audit_key() -> None:
    assert SecretBox(MASTER).derive_key(AUDIT_KEY_INFO) == derive_audit_key(MASTER)


def test_derived_keys_differ_by_label_and_master_key() -> None:
    box = SecretBox(MASTER)
    assert box.derive_key(b"one") != box.derive_key(b"two")
    assert SecretBox(bytes(32)).derive_key(AUDIT_KEY_INFO) != box.derive_key(AUDIT_KEY_INFO)
    assert MASTER not in (box.derive_key(b"one"), box.derive_key(AUDIT_KEY_INFO))


def test_derive_key_needs_a_label() -> None:
    with pytest.raises(ConfigError, match="info label"):
        SecretBox(MASTER).derive_key(b"")


def test_a_short_audit_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        AuditChain(b"short")


def test_the_chain_does_not_show_its_key() -> None:
    chain = AuditChain(KEY)
    assert repr(chain) == "AuditChain(<key hidden>)"
    assert not hasattr(chain, "__dict__")


# -- the record hash ---------------------------------------------------------------------


def test_record_hash_is_hmac_sha256_over_sorted_compact_json() -> None:
    fields = event_fields(_statement("SELECT 'é'"))
    expected_message = json.dumps(
        {**fields, "seq": 7, "prev_hash": GENESIS_HASH},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    expected = hmac.new(KEY, expected_message, hashlib.sha256).hexdigest()
    assert AuditChain(KEY).record_hash(GENESIS_HASH, 7, fields) == expected
    assert "é".encode() in expected_message


def test_the_canonical_encoding_is_byte_exact() -> None:
    event = AuditEvent(
        session_id="s",
        connection_id="c",
        kind="statement",
        occurred_at=datetime(2024, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1))),
        sql="SELECT $1",
        parameters=(Parameter(1, 25, "text", "x", True),),
        duration_ms=3,
        detail={"b": 1, "a": None},
    )
    assert canonical_encoding(event_fields(event)) == (
        b'{"command_tag":null,"connection_id":"c","copy_bytes":null,"copy_direction":null,'
        b'"detail":{"a":null,"b":1},"duration_ms":3.0,"error_message":null,"kind":"statement",'
        b'"occurred_at":"2024-01-02T03:04:05.000000+00:00","parameters":[{"format":"text",'
        b'"index":1,"truncated":true,"type_oid":25,"value":"x"}],"portal_name":null,'
        b'"protocol":null,"rows":null,"session_id":"s","sql":"SELECT $1","sqlstate":null,'
        b'"statement_name":null,"status":null}'
    )


def test_every_field_is_covered_by_the_hash() -> None:
    chain = AuditChain(KEY)
    base = _statement()
    original = chain.record_hash(GENESIS_HASH, 1, event_fields(base))
    changes: dict[str, Any] = {
        "session_id": "b" * 32,
        "connection_id": "d" * 32,
        "kind": "connection_end",
        "occurred_at": T0 + timedelta(microseconds=1),
        "protocol": "simple",
        "sql": "SELECT 2",
        "statement_name": "s1",
        "portal_name": "p1",
        "parameters": (Parameter(1, 23, "text", "43"),),
        "command_tag": "SELECT 2",
        "rows": 2,
        "status": "error",
        "sqlstate": "42P01",
        "error_message": "boom",
        "duration_ms": 1.25,
        "copy_direction": "in",
        "copy_bytes": 1,
        "detail": {"x": 1},
    }
    assert set(changes) == {f.name for f in dataclasses.fields(AuditEvent)}
    for name, value in changes.items():
        changed = dataclasses.replace(base, **{name: value})
        assert chain.record_hash(GENESIS_HASH, 1, event_fields(changed)) != original, name
    assert chain.record_hash(GENESIS_HASH, 2, event_fields(base)) != original
    assert chain.record_hash("1" * 64, 1, event_fields(base)) != original
    assert AuditChain(bytes(32)).record_hash(GENESIS_HASH, 1, event_fields(base)) != original


def test_parameters_none_and_empty_hash_differently() -> None:
    chain = AuditChain(KEY)
    unlogged = event_fields(_statement(parameters=None))
    none_bound = event_fields(_statement(parameters=()))
    assert unlogged["parameters"] is None
    assert none_bound["parameters"] == []
    assert chain.record_hash(GENESIS_HASH, 1, unlogged) != chain.record_hash(
        GENESIS_HASH, 1, none_bound
    )


def test_event_fields_normalise_time_and_duration() -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5)))
    fields = event_fields(_statement(occurred_at=local, duration_ms=5))
    assert fields["occurred_at"] == "2024-05-01T12:00:00.123456+00:00"
    assert fields["duration_ms"] == 5.0
    assert isinstance(fields["duration_ms"], float)
    assert fields["parameters"][1] == {
        "index": 2,
        "type_oid": 17,
        "format": "binary",
        "value": "AAE=",
        "truncated": False,
    }


def test_record_hash_refuses_fields_that_would_shadow_seq_or_prev_hash() -> None:
    with pytest.raises(ValueError, match="seq"):
        AuditChain(KEY).record_hash(GENESIS_HASH, 1, {"seq": 2})


def test_record_hash_refuses_what_json_cannot_carry() -> None:
    fields: Mapping[str, Any] = {**event_fields(_statement()), "duration_ms": float("nan")}
    with pytest.raises(ValueError):
        AuditChain(KEY).record_hash(GENESIS_HASH, 1, fields)


def test_a_seal_binds_session_count_and_head() -> None:
    chain = AuditChain(KEY)
    seal = chain.seal(SESSION, 3, "f" * 64)
    assert len(seal) == 64
    assert chain.is_valid_seal(SESSION, 3, "f" * 64, seal)
    assert not chain.is_valid_seal(SESSION, 2, "f" * 64, seal)
    assert not chain.is_valid_seal(SESSION, 3, "e" * 64, seal)
    assert not chain.is_valid_seal("b" * 32, 3, "f" * 64, seal)
    assert not AuditChain(bytes(32)).is_valid_seal(SESSION, 3, "f" * 64, seal)
    assert not chain.is_valid_seal(SESSION, 3, "f" * 64, "é" * 64)


def test_a_chain_with_older_keys_writes_under_its_own_and_verifies_under_any() -> None:
    older, oldest, foreign = bytes(range(1, 33)), bytes(range(2, 34)), bytes(range(3, 35))
    chain = AuditChain(KEY, [older, oldest])
    # Writing uses the chain's own key only.
    assert chain.seal(SESSION, 3, "f" * 64) == AuditChain(KEY).seal(SESSION, 3, "f" * 64)
    # Verifying names the key a MAC verifies under, whichever was tried last.
    for key, index in ((oldest, 2), (older, 1), (KEY, 0), (oldest, 2)):
        seal = AuditChain(key).seal(SESSION, 3, "f" * 64)
        found = chain.verifying(lambda c: c.seal(SESSION, 3, "f" * 64), seal)
        assert found is chain.candidates[index]
        assert chain.is_valid_seal(SESSION, 3, "f" * 64, seal)
        assert not chain.is_valid_seal(SESSION, 4, "f" * 64, seal)
    assert not chain.is_valid_seal(
        SESSION, 3, "f" * 64, AuditChain(foreign).seal(SESSION, 3, "f" * 64)
    )

    def unencodable(_chain: AuditChain) -> str:
        raise ValueError("a lone surrogate")

    assert chain.verifying(unencodable, chain.seal(SESSION, 3, "f" * 64)) is None


def test_describe_names_seq_kind_and_a_short_sql_excerpt() -> None:
    long_sql = "UPDATE accounts\n   SET balance = balance - 100 WHERE id = 1 AND owner = 'x'"
    assert describe(4, event_fields(_statement(long_sql))) == (
        "seq 4 (statement 'UPDATE accounts SET balance = balance - ...')"
    )
    start = AuditEvent(SESSION, "c", "connection_start", T0)
    assert describe(1, event_fields(start)) == "seq 1 (connection_start)"


# -- the verifier ----------------------------------------------------------------------


def _five() -> list[dict[str, Any]]:
    return _chain_of([_statement(f"SELECT {n}") for n in range(1, 6)])


def test_an_intact_chain_has_no_problems() -> None:
    rows = _five()
    assert _verify(rows) == []
    assert _verify(rows, ended=True, seal=(5, rows[-1]["hash"])) == []


def test_an_empty_trail_verifies_sealed_or_legacy() -> None:
    assert _verify([], ended=True, seal=(0, GENESIS_HASH)) == []
    assert _verify([], ended=True) == []


def test_an_edited_record_is_changed_and_named() -> None:
    rows = _five()
    rows[2]["fields"] = {**rows[2]["fields"], "sql": "SELECT 33"}
    found = _verify(rows)
    assert _problems(found) == [(3, "changed")]
    assert found[0].detail == "seq 3 (statement 'SELECT 33') does not match its hash: it was edited"
    assert found[0].session_id == SESSION


def test_an_edited_hash_breaks_the_next_link_but_is_reported_once() -> None:
    rows = _five()
    rows[1]["hash"] = "0" * 63 + "1"
    assert _problems(_verify(rows)) == [(2, "changed")]


def test_a_removed_record_is_a_gap() -> None:
    rows = _five()
    del rows[1]
    found = _verify(rows)
    assert _problems(found) == [(2, "removed")]
    assert found[0].detail == "seq 2 missing before seq 3 (statement 'SELECT 3')"


def test_removed_records_at_the_start_are_a_gap() -> None:
    found = _verify(_five()[2:])
    assert _problems(found) == [(1, "removed")]
    assert "seqs 1-2 missing" in found[0].detail


def test_records_moved_to_other_seqs_are_reordered_and_changed() -> None:
    rows = _five()
    rows[1]["seq"], rows[2]["seq"] = 3, 2
    rows.sort(key=lambda r: r["seq"])
    assert _problems(_verify(rows)) == [(2, "changed"), (3, "changed"), (3, "reordered")]


def test_records_swapped_across_an_intact_one_are_both_reordered() -> None:
    rows = _five()
    rows[1]["seq"], rows[3]["seq"] = 4, 2
    rows.sort(key=lambda r: r["seq"])
    found = _verify(rows)
    assert _problems(found) == [(2, "changed"), (2, "reordered"), (4, "changed"), (4, "reordered")]
    assert found[1].detail == (
        "seq 2 (statement 'SELECT 4') was stored out of seq order: it was moved here "
        "from another position"
    )


def test_records_edited_in_place_are_not_called_reordered() -> None:
    rows = _five()
    for row in rows[1:4]:
        row["fields"] = {**row["fields"], "sql": "SELECT 0"}
    assert _problems(_verify(rows)) == [(2, "changed"), (3, "changed"), (4, "changed")]


def test_intact_records_in_the_wrong_row_order_are_reordered() -> None:
    rows = _five()
    rows[1]["row_id"], rows[2]["row_id"] = rows[2]["row_id"], rows[1]["row_id"]
    found = _verify(rows)
    assert _problems(found) == [(3, "reordered")]
    assert found[0].detail == (
        "seq 3 (statement 'SELECT 3') was stored before seq 2: row order was changed"
    )


def test_a_long_run_of_failing_records_is_reported_in_order() -> None:
    rows = _chain_of([_statement(f"SELECT {n}") for n in range(1, 2502)])
    wrong = AuditChain(bytes(32))
    verifier = SessionVerifier(wrong, SESSION)
    for row in rows:
        verifier.feed(row["row_id"], row["seq"], row["prev_hash"], row["hash"], row["fields"])
    found = verifier.finish(ended=False, count=None, head=None, seal=None)
    assert [p.seq for p in found] == list(range(1, 2502))
    assert {p.problem for p in found} == {"changed"}


def test_a_valid_record_from_another_chain_is_not_linked() -> None:
    rows = _five()
    other = _chain_of([_statement(f"SELECT {n}") for n in (1, 20, 30)])
    rows[2] = {**other[2], "row_id": rows[2]["row_id"]}
    found = _verify(rows)
    assert _problems(found) == [(3, "removed"), (4, "removed")]
    assert "not chained to seq 2" in found[0].detail


def test_a_repeated_seq_is_reordered() -> None:
    rows = _five()
    rows.insert(2, {**rows[1], "row_id": 25})
    assert (2, "reordered") in _problems(_verify(rows))


def test_records_missing_at_the_end_of_a_sealed_trail_are_truncated() -> None:
    rows = _five()
    found = _verify(rows[:3], ended=True, seal=(5, rows[-1]["hash"]))
    assert _problems(found) == [(4, "truncated")]
    assert found[0].detail == "seqs 4-5 missing at the end (the session was sealed with 5 records)"
    assert _problems(_verify([], ended=True, seal=(5, rows[-1]["hash"]))) == [(1, "truncated")]


def test_a_replaced_last_record_does_not_match_the_head() -> None:
    rows = _five()
    assert _problems(_verify(rows, ended=True, seal=(5, "e" * 64))) == [(5, "truncated")]


def test_a_forged_or_edited_seal_is_a_seal_problem() -> None:
    rows = _five()
    found = _verify(rows, ended=True, seal=(5, rows[-1]["hash"]), seal_override="a" * 64)
    assert _problems(found) == [(None, "seal")]
    assert "does not match" in found[0].detail


def test_an_ended_trail_without_a_seal_is_a_seal_problem() -> None:
    assert _problems(_verify(_five(), ended=True)) == [(None, "seal")]


def test_records_after_the_seal_are_a_seal_problem() -> None:
    rows = _five()
    assert _problems(_verify(rows, ended=True, seal=(4, rows[3]["hash"]))) == [(5, "seal")]


def test_a_sealed_session_marked_active_is_a_seal_problem() -> None:
    rows = _five()
    found = _verify(rows, ended=False, seal=(5, rows[-1]["hash"]))
    assert _problems(found) == [(None, "seal")]
    assert "reopened" in found[0].detail


def test_a_record_with_unparseable_content_is_changed_not_a_crash() -> None:
    rows = _five()
    rows[0]["fields"] = {**rows[0]["fields"], "duration_ms": float("inf")}
    assert _problems(_verify(rows)) == [(1, "changed")]
