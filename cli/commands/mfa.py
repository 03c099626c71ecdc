"""`pam mfa ...`: a second factor (TOTP) for signing in and for the grants that ask one.

`pam mfa enroll` shows a QR code and the secret (once), then asks for the app's
first code, which turns the factor on. Replacing or turning off an active one
needs a current code; an admin of every project resets a user's lost one.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from cli.client import ApiError, MfaStatusJson
from cli.commands import api_client, json_option
from cli.mfa import ask_code, qr_text, with_second_factor
from cli.render import console, key_values, local_time, print_json, printable


@click.group("mfa")
def mfa() -> None:
    """Your second factor (an authenticator app's codes)."""


@mfa.command("status")
@click.argument("user", required=False)
@json_option
def mfa_status(user: str | None, as_json: bool) -> None:
    """Whether the second factor is on (yours, or USER's: admins of every project)."""
    with api_client() as client:
        status = client.mfa_status(user)
    if as_json:
        print_json(status)
        return
    state = "on" if status["enabled"] else "off"
    pairs: list[tuple[str, object]] = [("user", status["user"]), ("second factor", state)]
    if status["enabled_at"]:
        pairs.append(("since", local_time(status["enabled_at"])))
    if status["pending"]:
        pairs.append(("pending", "an enrolment waits for its first code (pam mfa confirm)"))
    if status["reset_by"]:
        pairs.append(("reset", f"by {status['reset_by']} {local_time(status['reset_at'])}"))
    key_values(pairs)


@mfa.command("enroll")
@click.option(
    "--current-code",
    default=None,
    help="A current code of the second factor being replaced (asked for if needed).",
)
@click.option(
    "--no-confirm",
    is_flag=True,
    help="Show the secret and stop; turn it on later with `pam mfa confirm CODE`.",
)
@json_option
def mfa_enroll(current_code: str | None, no_confirm: bool, as_json: bool) -> None:
    """Set up a second factor: scan the QR code, then type the app's first code.

    The secret is shown here once. With --json (for scripts) the answer is the
    secret and its otpauth:// URI, and `pam mfa confirm CODE` turns it on.
    """
    with api_client() as client:
        enrolment = with_second_factor(client.mfa_enroll, current_code)
        if as_json:
            print_json(enrolment)
            return
        click.echo("Scan this QR code with your authenticator app, or type the secret in:")
        click.echo(qr_text(enrolment["uri"]), nl=False)
        click.echo(f"  secret   {enrolment['secret']}")
        click.echo(f"  account  {enrolment['account']} (issuer {enrolment['issuer']})")
        click.echo(f"  uri      {enrolment['uri']}")
        click.echo("The secret is not shown again.")
        if no_confirm:
            click.echo("Turn it on with `pam mfa confirm CODE` once the app shows a code.")
            return
        code = ask_code("First code from the app")
        if code is None:
            raise click.UsageError(
                "no terminal to ask for the first code: run `pam mfa confirm CODE`"
            )
        _confirm(client.mfa_confirm, code)


def _confirm(confirm: Callable[[str], MfaStatusJson], code: str) -> None:
    try:
        status = confirm(code)
    except ApiError as exc:
        raise ApiError(
            f"the second factor is not on yet: {exc.message}",
            hint="type a new code with `pam mfa confirm CODE`, or start over with `pam mfa enroll`",
            status=exc.status,
            code=exc.code,
        ) from None
    console.print(
        f"Second factor on for {printable(status['user'])}: a code is asked at sign-in"
        " and for access a policy marks --require-mfa.",
        markup=False,
    )


@mfa.command("confirm")
@click.argument("code", required=False)
def mfa_confirm(code: str | None) -> None:
    """Turn on the enrolled second factor with the app's first CODE (asked for if not given)."""
    code = code or ask_code("First code from the app")
    if code is None:
        raise click.UsageError("no code: give it as `pam mfa confirm CODE`")
    with api_client() as client:
        _confirm(client.mfa_confirm, code)


@mfa.command("disable")
@click.option("--code", default=None, help="A current code (asked for if not given).")
def mfa_disable(code: str | None) -> None:
    """Turn your second factor off (needs a current code)."""
    with api_client() as client:
        status = with_second_factor(client.mfa_disable, code)
    console.print(f"Second factor off for {printable(status['user'])}", markup=False)


@mfa.command("reset")
@click.argument("user")
def mfa_reset(user: str) -> None:
    """Remove USER's second factor, e.g. a lost phone (admins of every project; recorded)."""
    with api_client() as client:
        client.mfa_reset(user)
    console.print(
        f"Second factor of {printable(user)} removed; they can enrol again with `pam mfa enroll`",
        markup=False,
    )


__all__ = ["mfa"]
