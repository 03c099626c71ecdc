"""`pam webhook add|list|remove|test|deliveries`: notifications to a project's receivers.

A webhook's signing secret is printed once, by `pam webhook add`: the gateway
keeps it sealed and never shows it again. URLs and errors came from outside
and are printed escaped (:func:`printable`), never as markup.
"""

from __future__ import annotations

import time

import click

from cli.api_json import DeliveryJson
from cli.client import ApiClient
from cli.commands import api_client, json_option
from cli.render import console, local_time, print_json, printable, table

#: how often `pam webhook test` asks whether its delivery was attempted
_POLL_SECONDS = 0.2


@click.group("webhook")
def webhook() -> None:
    """Webhooks: a signed JSON POST per event to a project's receivers."""


@webhook.command("add")
@click.argument("url")
@click.option(
    "--event",
    "events",
    multiple=True,
    required=True,
    help="An event to send (repeat it), e.g. access.opened; * for every event.",
)
@click.option("--project", default="default", show_default=True)
@json_option
def webhook_add(url: str, events: tuple[str, ...], project: str, as_json: bool) -> None:
    """Send the project's EVENTs to URL; prints the signing secret, once."""
    with api_client() as client:
        added = client.add_webhook(url, events=list(events), project=project)
    if as_json:
        print_json(added)
        return
    console.print(
        f"Added webhook {added['id'][:8]} for project {printable(added['project'])}:"
        f" {printable(added['url'])}",
        markup=False,
    )
    console.print(f"events: {', '.join(printable(e) for e in added['events'])}", markup=False)
    click.echo(f"secret: {added['secret']}")
    click.echo(
        "The secret will not be shown again: store it now; the receiver checks the"
        " X-Pam-Signature header with it (docs/webhooks.md)."
    )


@webhook.command("list")
@json_option
def webhook_list(as_json: bool) -> None:
    """The webhooks of every project you administer."""
    with api_client() as client:
        found = client.list_webhooks()
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["id", "project", "url", "events", "created", "by"],
        [
            [
                w["id"][:8],
                w["project"],
                w["url"],
                ", ".join(w["events"]),
                local_time(w["created_at"]),
                w["created_by"],
            ]
            for w in found
        ],
    )


@webhook.command("remove")
@click.argument("webhook_id", metavar="ID")
def webhook_remove(webhook_id: str) -> None:
    """Remove a webhook and its deliveries (pending ones are not sent)."""
    with api_client() as client:
        client.remove_webhook(webhook_id)
    console.print(f"Removed webhook {printable(webhook_id)}", markup=False)


@webhook.command("test")
@click.argument("webhook_id", metavar="ID")
@click.option(
    "--wait",
    type=click.FloatRange(0, 600),
    default=15.0,
    show_default=True,
    help="Seconds to wait for the first attempt's outcome (0: do not wait).",
)
@json_option
def webhook_test(webhook_id: str, wait: float, as_json: bool) -> None:
    """Send a webhook.test event to the webhook now and say how it went."""
    with api_client() as client:
        delivery = client.test_webhook(webhook_id)
        delivery = _first_attempt(client, delivery, wait)
    if as_json:
        print_json(delivery)
        return
    name = f"test delivery {delivery['id'][:8]}"
    if delivery["state"] == "delivered":
        console.print(f"Delivered {name}: HTTP {delivery['last_status_code']}", markup=False)
    elif delivery["attempts"] == 0:
        console.print(
            f"Queued {name}; see `pam webhook deliveries {delivery['webhook_id'][:8]}`",
            markup=False,
        )
    else:
        retry = (
            f"; next attempt at {local_time(delivery['next_attempt_at'])}"
            if delivery["next_attempt_at"]
            else ""
        )
        raise click.ClickException(f"{name} failed: {printable(_outcome(delivery))}{retry}")


def _first_attempt(client: ApiClient, delivery: DeliveryJson, wait: float) -> DeliveryJson:
    """*delivery* once its first attempt is recorded, or as it is after *wait* seconds."""
    deadline = time.monotonic() + wait
    while delivery["attempts"] == 0 and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        found = [
            d
            for d in client.webhook_deliveries(delivery["webhook_id"], limit=50)
            if d["id"] == delivery["id"]
        ]
        if found:
            delivery = found[0]
    return delivery


def _outcome(delivery: DeliveryJson) -> str:
    if delivery["last_error"]:
        return delivery["last_error"]
    if delivery["last_status_code"] is not None:
        return f"HTTP {delivery['last_status_code']}"
    return "-"


@webhook.command("deliveries")
@click.argument("webhook_id", metavar="ID")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
def webhook_deliveries(webhook_id: str, limit: int, as_json: bool) -> None:
    """A webhook's deliveries, newest first: state, attempts, last outcome, next attempt."""
    with api_client() as client:
        found = client.webhook_deliveries(webhook_id, limit=limit)
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["id", "event", "occurred", "state", "attempts", "last outcome", "next attempt"],
        [
            [
                d["id"][:8],
                d["event"],
                local_time(d["occurred_at"]),
                d["state"],
                d["attempts"],
                _outcome(d),
                local_time(d["next_attempt_at"]),
            ]
            for d in found
        ],
    )


__all__ = ["webhook"]
