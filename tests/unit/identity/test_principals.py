"""Tests of gateway.identity.principals: roles per project, ``*``, deny by default."""

from __future__ import annotations

from gateway.identity.principals import Principal, PrincipalKind, Role


def principal(roles: dict[str, Role], groups: frozenset[str] = frozenset()) -> Principal:
    return Principal("id", "carol", PrincipalKind.USER, roles, groups)


def test_a_role_in_every_project_holds_in_any_project() -> None:
    admin = principal({"*": Role.ADMIN})
    assert admin.is_admin()
    assert admin.is_admin("analytics")
    assert admin.reads_all_sessions("default")
    assert admin.may_request_access("anything")


def test_a_project_role_holds_only_there() -> None:
    admin = principal({"analytics": Role.ADMIN})
    assert admin.is_admin("analytics")
    assert not admin.is_admin("default")
    assert not admin.is_admin()  # not of every project
    assert admin.role_in("default") is None


def test_a_project_role_wins_over_the_every_project_one() -> None:
    mixed = principal({"*": Role.MEMBER, "analytics": Role.AUDITOR})
    assert mixed.role_in("analytics") is Role.AUDITOR
    assert mixed.role_in("default") is Role.MEMBER
    assert not mixed.may_request_access("analytics")
    assert mixed.may_request_access("default")


def test_auditor_reads_but_never_requests_access() -> None:
    auditor = principal({"default": Role.AUDITOR})
    assert auditor.reads_all_sessions("default")
    assert not auditor.may_request_access("default")
    assert not auditor.is_admin("default")


def test_member_requests_access_but_reads_only_its_own() -> None:
    member = principal({"default": Role.MEMBER})
    assert member.may_request_access("default")
    assert not member.reads_all_sessions("default")
    assert not member.is_admin("default")


def test_no_role_may_do_nothing() -> None:
    nobody = principal({})
    assert nobody.role_in("default") is None
    assert not nobody.is_admin()
    assert not nobody.reads_all_sessions("default")
    assert not nobody.may_request_access("default")
    assert nobody.projects == frozenset()


def test_subjects_are_names_or_groups() -> None:
    dba = principal({"default": Role.MEMBER}, frozenset({"dba"}))
    assert dba.matches_subject("carol")
    assert dba.matches_subject("@dba")
    assert not dba.matches_subject("dba")
    assert not dba.matches_subject("@carol")
    assert not dba.matches_subject("@ops")
