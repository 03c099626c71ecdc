"""Grant role names and statements: pure, byte-exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.credentials.ephemeral import sql
from gateway.errors import InvalidRequest

GRANT = "0123abcdef4567890123456789abcdef"


@pytest.mark.parametrize(
    ("requester", "expected"),
    [
        ("alice", "pam_alice_0123abcd"),
        ("Alice.Smith@Example.COM", "pam_alice_smith_example_com_0123abcd"),
        ("bob--o'neil", "pam_bob_o_neil_0123abcd"),
        ("_x_", "pam_x_0123abcd"),
        ("Ölaf", "pam_laf_0123abcd"),
        ("日本", "pam_user_0123abcd"),
        ("", "pam_user_0123abcd"),
    ],
)
def test_a_role_name_is_the_requester_made_plain_and_the_grant_s_prefix(
    requester: str, expected: str
) -> None:
    assert sql.ephemeral_role_name(requester, GRANT) == expected


def test_a_role_name_is_never_longer_than_postgresql_keeps() -> None:
    name = sql.ephemeral_role_name("a" * 200 + "_" * 50, GRANT)
    assert len(name.encode()) == sql.MAX_ROLE_NAME_BYTES
    assert name.startswith("pam_aaaa") and name.endswith("_0123abcd")
    # a cut that lands on a run of _ does not leave a double _
    cut = sql.ephemeral_role_name("a" * 49 + "_b", GRANT)
    assert "__" not in cut and len(cut) <= sql.MAX_ROLE_NAME_BYTES
    assert sql.check_role_name("role", name) == name


def test_two_grants_of_one_user_get_two_names_and_a_non_id_is_refused() -> None:
    assert sql.ephemeral_role_name("alice", GRANT) != sql.ephemeral_role_name(
        "alice", "fedcba98" + GRANT[8:]
    )
    with pytest.raises(InvalidRequest):
        sql.ephemeral_role_name("alice", "not-hex!")


@pytest.mark.parametrize("name", ["App_Reader", "1role", "a-b", 'x"y', "", "a" * 64, "a b"])
def test_a_template_that_is_not_a_plain_role_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match="not a plain role name"):
        sql.check_role_name("the template role", name)


def test_create_role_sends_the_scram_secret_and_the_end_in_utc() -> None:
    ends = datetime(2026, 5, 1, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    statement = sql.create_role_sql(
        "pam_alice_0123abcd",
        secret="SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy",
        valid_until=ends,
        template="app_reader",
        marker="pam_managed",
        comment="pam gateway g1 grant " + GRANT,
    )
    assert statement == (
        'CREATE ROLE "pam_alice_0123abcd" LOGIN'
        " PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy'"
        " VALID UNTIL '2026-05-01T12:30:05+00:00'"
        ' IN ROLE "app_reader", "pam_managed";'
        f" COMMENT ON ROLE \"pam_alice_0123abcd\" IS 'pam gateway g1 grant {GRANT}'"
    )


def test_the_end_of_a_role_is_disable_terminate_then_reassign_and_drop() -> None:
    assert sql.disable_role_sql("pam_a_1") == (
        'ALTER ROLE "pam_a_1" NOLOGIN PASSWORD NULL; GRANT "pam_a_1" TO CURRENT_USER'
    )
    assert "pg_terminate_backend(pid, 5000)" in sql.terminate_backends_sql("pam_a_1")
    assert "usename = 'pam_a_1'" in sql.terminate_backends_sql("pam_a_1")
    assert sql.drop_role_sql("pam_a_1", None) == (
        'REASSIGN OWNED BY "pam_a_1" TO CURRENT_USER; DROP OWNED BY "pam_a_1"; DROP ROLE "pam_a_1"'
    )
    assert 'TO "app_owner";' in sql.drop_role_sql("pam_a_1", "app_owner")
    moved = sql.valid_until_sql("pam_a_1", datetime(2026, 1, 1, tzinfo=UTC))
    assert moved == "ALTER ROLE \"pam_a_1\" VALID UNTIL '2026-01-01T00:00:00+00:00'"


def test_the_dry_run_is_rolled_back_and_the_marker_made_if_missing() -> None:
    statement = sql.dry_run_sql("pam_check_1", template="app_reader", marker="pam_managed")
    assert statement.startswith("BEGIN; DO $pam$ BEGIN IF NOT EXISTS")
    assert statement.endswith('GRANT "pam_check_1" TO CURRENT_USER; ROLLBACK')
    assert 'CREATE ROLE "pam_check_1" NOLOGIN IN ROLE "app_reader", "pam_managed"' in statement
    assert "EXCEPTION WHEN duplicate_object OR unique_violation" in sql.ensure_marker_sql("m")


def test_names_in_lookups_are_quoted_as_literals() -> None:
    assert "rolname = 'it''s'" in sql.role_state_sql("it's", "pam_managed")
    assert "g.rolname = 'pam_managed'" in sql.role_state_sql("r", "pam_managed")
    assert "rolname = 'x''y'" in sql.template_sql("x'y")


def test_a_role_s_state_is_read_from_the_text_row() -> None:
    assert sql.role_state_of([]) is None
    state = sql.role_state_of([[b"pam_a_1", b"t", b"f", b"pam gateway g grant " + GRANT.encode()]])
    assert state == sql.RoleState("pam_a_1", True, False, "pam gateway g grant " + GRANT)
    assert sql.is_for_grant(state, GRANT)
    assert not sql.is_for_grant(state, "f" * 32)
    unmarked = sql.role_state_of([[b"pam_a_1", b"f", b"f", None]])
    assert unmarked is not None and not sql.is_for_grant(unmarked, GRANT)
    # a comment removed by hand: the marker alone says it is pam's
    bare = sql.role_state_of([[b"pam_a_1", b"t", b"f", None]])
    assert bare is not None and sql.is_for_grant(bare, GRANT)
