"""A second factor (TOTP) as people use it: real `pam` processes, a real daemon and
a real PostgreSQL (issue 14, point 4).

Each user has a client config of its own, filled by `pam login`. Codes are
computed here from the secret `pam mfa enroll` printed, with cryptography's TOTP
at the time they are sent, as an authenticator app would (:class:`App`), and a
replay is the same code sent twice. The daemon's own host admin (the config
`gateway init` wrote) adds users, policies and resets.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from harness import AccessProcess, Gateway, _Drain, store_path, wait_for
from psycopg_pool import ConnectionPool

pytestmark = pytest.mark.integration

PASSWORD = "pw-mfa-Secret-7"
STEP = 30
#: what `pam mfa enroll` prints the secret as
SECRET_LINE = re.compile(r"^  secret   ([A-Z2-7]+)$", re.MULTILINE)
#: the QR code is drawn with block characters (segno's compact terminal output)
QR_BLOCKS = set("█▀▄")


class App:
    """An authenticator app holding one secret: hands out codes the gateway has
    not seen yet, in time-step order, at most one step ahead of now (so each is
    still inside the gateway's window when it arrives)."""

    def __init__(self, secret: str) -> None:
        key = _b32(secret)
        self._totp = TOTP(key, 6, SHA1(), STEP)  # noqa: S303 (RFC 6238's HMAC, as the apps)
        self.last_step: int | None = None
        self.last = ""

    def code(self) -> str:
        now_step = int(time.time() // STEP)
        step = now_step if self.last_step is None else max(now_step, self.last_step + 1)
        if step > now_step + 1:
            # Both usable codes of this moment are used: wait for the next step.
            wait_for(lambda: time.time() // STEP >= step - 1, timeout=2 * STEP)
        self.last_step = step
        self.last = self._totp.generate(step * STEP).decode()
        return self.last

    def wrong(self) -> str:
        """A code no nearby step has."""
        now = time.time()
        near = {self._totp.generate(now + k * STEP).decode() for k in range(-2, 3)}
        return next(c for c in ("000000", "111111", "222222", "333333") if c not in near)


def _b32(secret: str) -> bytes:
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


@dataclass
class User:
    """A person with a client config of their own."""

    gw: Gateway
    name: str
    config: Path
    url: str
    ca_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {**self.gw.env, "PAM_CONFIG": str(self.config)}

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            input=input,
            # Never the test's own terminal: a prompt must not wait for a person.
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        self.gw.transcript.add(result.stdout)
        self.gw.transcript.add(result.stderr)
        return result

    def ok(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, input=input)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def login(self, *extra: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(
            "login",
            "--gateway",
            self.url,
            "--ca-cert",
            str(self.ca_file),
            "--user",
            self.name,
            "--password-stdin",
            *extra,
            input=PASSWORD + "\n" if input is None else input,
        )

    def enroll(self) -> App:
        """Enrol as a script does: the secret as JSON, then `pam mfa confirm`."""
        enrolment = json.loads(self.ok("mfa", "enroll", "--json").stdout)
        app = App(enrolment["secret"])
        SECRETS.append(enrolment["secret"])
        self.ok("mfa", "confirm", app.code())
        return app

    def access(self, *args: str, stdin: str | None = None) -> AccessProcess:
        command = ["db", "access", "--resource", "prod", "--account", "scram", "--duration", "10m"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *command, *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        access = AccessProcess(
            proc, _Drain(proc.stdout, self.gw.transcript), _Drain(proc.stderr, self.gw.transcript)
        )
        self.gw.accesses.append(access)
        return access


#: every secret an enrolment printed in this module (checked against the log
#: and the store file at the end)
SECRETS: list[str] = []


def one_error_line(result: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> str:
    code, stdout, stderr = (
        (result.returncode, result.stdout, result.stderr)
        if isinstance(result, subprocess.CompletedProcess)
        else result
    )
    assert code == 1, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def gw(module_gateway: Gateway) -> Iterator[Gateway]:
    """The module's daemon, with group ``mfa``'s policy on ``prod`` requiring a
    second factor."""
    module_gateway.cli(
        "policy", "add", "mfa-prod", "--subject", "@mfa", "--resource", "prod",
        "--account", "*", "--max-duration", "1h", "--require-mfa",
    )  # fmt: skip
    yield module_gateway


def new_user(gw: Gateway, tmp_path: Path, name: str, *extra: str, login: bool = True) -> User:
    gw.cli("user", "add", name, "--password-stdin", *extra, input=PASSWORD + "\n")
    config = json.loads(gw.config_path.read_text())
    ca_file = tmp_path / f"{name}-ca.pem"
    ca_file.write_text(config["ca_cert"])
    user = User(gw, name, tmp_path / f"{name}.json", config["api_url"], ca_file)
    if login:
        assert user.login().returncode == 0
    return user


def member(gw: Gateway, tmp_path: Path, name: str, *, login: bool = True) -> User:
    return new_user(
        gw, tmp_path, name, "--role", "member", "--project", "default", "--group", "mfa",
        login=login,
    )  # fmt: skip


# --- enrolment ----------------------------------------------------------------------------


def test_enrol_shows_a_qr_code_and_the_secret_once_and_the_first_code_turns_it_on(
    gw: Gateway, tmp_path: Path
) -> None:
    mia = member(gw, tmp_path, "mia")

    def enroll_typing(first_code: Any) -> tuple[int, str, str, str]:
        """`pam mfa enroll`, typing the first code once the secret is shown."""
        with subprocess.Popen(
            [sys.executable, "-m", "cli", "mfa", "enroll"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=mia.env,
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stderr is not None
            shown = ""
            while (match := SECRET_LINE.search(shown)) is None:
                line = proc.stdout.readline()
                assert line, f"no secret shown: {shown!r} {proc.stderr.read()}"
                shown += line
            secret = match.group(1)
            SECRETS.append(secret)
            proc.stdin.write(first_code(App(secret)) + "\n")
            proc.stdin.close()
            # Read through the same buffered files (communicate() would read
            # the pipes beneath them and miss what readline() already buffered).
            rest = proc.stdout.read()
            stderr = proc.stderr.read()
            proc.wait(60)
        gw.transcript.add(shown + rest + stderr)
        return proc.returncode, shown + rest, stderr, secret

    code, out, err, first_secret = enroll_typing(lambda app: app.wrong())
    assert QR_BLOCKS & set(out), out
    assert f"otpauth://totp/pam:mia%40{gw_id(gw)}?" in out
    line = one_error_line((code, out, err))
    assert "the second factor is not on yet: wrong second-factor code" in line
    assert line.endswith("(hint: type a new code with `pam mfa confirm CODE`, or start over"
                         " with `pam mfa enroll`)")  # fmt: skip
    status = json.loads(mia.ok("mfa", "status", "--json").stdout)
    assert (status["enabled"], status["pending"]) == (False, True)

    code, out, err, secret = enroll_typing(lambda app: app.code())
    assert code == 0, (out, err)
    assert secret != first_secret
    assert "Second factor on for mia" in out
    status = json.loads(mia.ok("mfa", "status", "--json").stdout)
    assert (status["user"], status["enabled"], status["pending"]) == ("mia", True, False)
    # Shown once: nothing else shows it again.
    for shown in (
        mia.ok("mfa", "status").stdout,
        mia.ok("whoami").stdout,
        mia.ok("whoami", "--json").stdout,
        gw.cli("user", "list", "--json").stdout,
    ):
        assert secret not in shown
    assert "second factor on" in mia.ok("whoami").stdout
    listed = {u["name"]: u for u in json.loads(gw.cli("user", "list", "--json").stdout)}
    assert listed["mia"]["mfa_enabled"] is True
    # Confirming again with nothing pending is one line.
    again = mia.run("mfa", "confirm", "123456")
    assert "no enrolment is waiting for its first code" in one_error_line(again)


def gw_id(gw: Gateway) -> str:
    gateway_id: str = json.loads(gw.config_path.read_text())["gateway_id"]
    return gateway_id


# --- signing in -----------------------------------------------------------------------------


def test_sign_in_asks_for_the_code_refuses_wrong_and_replayed_ones_and_pauses(
    gw: Gateway, tmp_path: Path
) -> None:
    noa = member(gw, tmp_path, "noa")
    app = noa.enroll()

    # The right password and no code, and nobody to ask: the gateway's words.
    line = one_error_line(noa.login())
    assert line == (
        "error: signing in needs a second-factor code"
        " (hint: give the current code from your authenticator app (--otp CODE))"
    )
    line = one_error_line(noa.login("--otp", app.wrong()))
    assert line.startswith("error: wrong second-factor code")
    # Asked for and answered (stdin's second line, as a terminal would be).
    result = noa.login(input=f"{PASSWORD}\n{app.code()}\n")
    assert result.returncode == 0, result.stderr
    assert "Signed in" in result.stdout
    assert "second factor on" in noa.ok("whoami").stdout
    # The same code again: refused, though it is right and still current.
    line = one_error_line(noa.login("--otp", app.last))
    assert line == (
        "error: this second-factor code was already used"
        " (hint: wait for the next code (a new one every 30 s))"
    )
    # Wrong codes: after five, even a right one is refused until the window passes.
    for _ in range(5):
        assert "wrong second-factor code" in one_error_line(noa.login("--otp", app.wrong()))
    line = one_error_line(noa.login("--otp", app.code()))
    assert re.fullmatch(
        r"error: too many wrong second-factor codes \(hint: try again in \d+ s\)", line
    ), line
    refusals = json.loads(gw.cli("audit", "refusals", "--json").stdout)
    reasons = {r["reason"] for r in refusals if r["who"] == "noa"}
    assert {"mfa_required", "bad_mfa_code"} <= reasons


# --- grants ----------------------------------------------------------------------------------


def test_a_policy_requiring_mfa_asks_once_per_grant_not_per_connection(
    gw: Gateway, tmp_path: Path
) -> None:
    ola = member(gw, tmp_path, "ola")
    app = ola.enroll()

    # No code and nobody to ask: a clear refusal, one line, non-zero.
    refused = ola.access()
    assert refused.wait(60) == 1
    line = one_error_line((1, refused.stdout.text(), refused.stderr.text()))
    assert line == (
        "error: this access needs a second-factor code"
        " (hint: give the current code from your authenticator app (--otp CODE))"
    )

    # Asked once (no --otp: the code is the answer on stdin), then the grant opens.
    access = ola.access(stdin=app.code() + "\n").wait_ready()
    grant_code = app.last
    with gw.api() as api:
        session = api.get_session(access.session_prefix)["session"]
    assert (session["requester"], session["policy_name"]) == ("ola", "mfa-prod")

    # Twenty pooled connections through the one grant, none asked for anything.
    with ConnectionPool(access.dsn(), min_size=20, max_size=20, open=True, timeout=60) as pool:
        pool.wait(timeout=120)
        held = [pool.getconn() for _ in range(20)]
        try:
            pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in held}
            assert len(pids) == 20
            with gw.api() as api:
                assert api.get_session(session["id"])["live_connections"] == 20
        finally:
            for conn in held:
                pool.putconn(conn)
    # And one more, outside the pool, after them.
    with psycopg.connect(access.dsn(), connect_timeout=30) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (access.user,)
    assert access.proc.poll() is None
    access.stop()

    # The grant's code again, for a second grant: a replay.
    replay = ola.access("--otp", grant_code)
    assert replay.wait(60) == 1
    line = one_error_line((1, replay.stdout.text(), replay.stderr.text()))
    assert line.startswith("error: this second-factor code was already used")
    refusals = json.loads(gw.cli("audit", "refusals", "--json").stdout)
    mine = [r for r in refusals if r["who"] == "ola"]
    assert {r["reason"] for r in mine} == {"mfa_required", "bad_mfa_code"}
    assert all(r["place"] == "api" for r in mine)  # no connection was ever refused


def test_a_policy_requiring_mfa_refuses_a_user_without_one_with_a_hint(
    gw: Gateway, tmp_path: Path
) -> None:
    pia = member(gw, tmp_path, "pia")
    refused = pia.access("--otp", "123456")
    assert refused.wait(60) == 1
    line = one_error_line((1, refused.stdout.text(), refused.stderr.text()))
    assert line == (
        "error: this access needs a second factor, and pia has none"
        " (hint: enrol one with `pam mfa enroll`)"
    )


def test_an_admin_who_enrolled_is_asked_on_every_grant(gw: Gateway, tmp_path: Path) -> None:
    ada = new_user(gw, tmp_path, "ada", "--role", "admin")
    # Not enrolled: an admin's grant needs no code.
    ada.access().wait_ready().stop()
    app = ada.enroll()
    refused = ada.access()
    assert refused.wait(60) == 1
    assert "this access needs a second-factor code" in one_error_line(
        (1, refused.stdout.text(), refused.stderr.text())
    )
    ada.access("--otp", app.code()).wait_ready().stop()


# --- turning it off --------------------------------------------------------------------------


def test_disable_needs_a_code_and_an_admin_resets_a_lost_one(gw: Gateway, tmp_path: Path) -> None:
    quinn = member(gw, tmp_path, "quinn")
    app = quinn.enroll()
    line = one_error_line(quinn.run("mfa", "disable"))
    assert line.startswith("error: turning the second factor off needs a second-factor code")
    assert "wrong second-factor code" in one_error_line(
        quinn.run("mfa", "disable", "--code", app.wrong())
    )
    assert "Second factor off for quinn" in quinn.ok("mfa", "disable", "--code", app.code()).stdout
    assert json.loads(quinn.ok("mfa", "status", "--json").stdout)["enabled"] is False

    # Again, and the phone is lost: a member cannot reset; an admin of every project can.
    quinn.enroll()
    line = one_error_line(quinn.run("mfa", "reset", "quinn"))
    assert "is not an administrator of every project" in line
    assert "removed" in gw.cli("mfa", "reset", "quinn").stdout
    status = json.loads(gw.cli("mfa", "status", "quinn", "--json").stdout)
    assert (status["enabled"], status["reset_by"]) == (False, gw_admin(gw))
    assert status["reset_at"]
    assert "mfa_reset" in gw.log()
    # Signing in needs no code any more.
    assert quinn.login().returncode == 0


def gw_admin(gw: Gateway) -> str:
    name: str = json.loads(gw.cli("whoami", "--json").stdout)["name"]
    return name


# --- project settings --------------------------------------------------------------------------


def test_project_settings_round_trip_for_the_projects_admins(gw: Gateway, tmp_path: Path) -> None:
    shown = json.loads(gw.cli("project", "show", "default", "--json").stdout)
    assert (shown["project"], shown["approval_mfa"], shown["updated_at"]) == (
        "default",
        False,
        None,
    )
    set_on = json.loads(gw.cli("project", "set", "default", "--approval-mfa", "--json").stdout)
    assert (set_on["approval_mfa"], set_on["updated_by"]) == (True, gw_admin(gw))
    assert "approvals need MFA  yes" in gw.cli("project", "show", "default").stdout
    rex = member(gw, tmp_path, "rex")
    line = one_error_line(rex.run("project", "set", "default", "--no-approval-mfa"))
    assert "is not an administrator of project 'default'" in line
    line = one_error_line(rex.run("project", "show", "default"))
    assert "is not an administrator or auditor of project 'default'" in line
    gw.cli("project", "set", "default", "--no-approval-mfa")
    assert (
        json.loads(gw.cli("project", "show", "default", "--json").stdout)["approval_mfa"] is False
    )
    usage = gw.cli("project", "set", "default", check=False)
    assert usage.returncode == 2 and "nothing to set" in usage.stderr


# --- no secret anywhere -----------------------------------------------------------------------


def test_no_secret_in_the_daemon_log_or_the_store_file(gw: Gateway) -> None:
    """Runs last in the module: every secret enrolled above."""
    assert len(SECRETS) >= 5
    log = gw.log()
    files = [p.read_bytes() for p in store_path(gw).parent.glob(store_path(gw).name + "*")]
    assert files
    for secret in SECRETS:
        assert secret not in log
        raw = _b32(secret)
        for data in files:
            assert secret.encode() not in data and raw not in data
