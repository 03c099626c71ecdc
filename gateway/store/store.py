"""The state store: resources, accounts, access sessions, connections and the audit trail.

Role: the gateway's only persistent state, behind a small synchronous API that the
service layer calls from one worker thread or via ``asyncio.to_thread``. The same
code runs on SQLite (the default, a single file) and on PostgreSQL.
:class:`Store` is composed of one class per aggregate, each in its own module,
over :class:`~gateway.store.engine.StoreBase` (the engine, the secret box, the
clock and the audit chain they share):

* :mod:`gateway.store.engine`: the engine, SQLite's settings, migrations, the
  transaction helper;
* :mod:`gateway.store.validation`: input checks, audit event rows;
* :mod:`gateway.store.rows`: look-ups shared by the aggregates;
* :mod:`gateway.store.resources`: resources and accounts (sealed passwords);
* :mod:`gateway.store.rotations`: rotation roles, rotations in flight, their record
  (chained and sealed by :mod:`gateway.store.rotation_chain`);
* :mod:`gateway.store.schedules`: rotation schedules; :mod:`gateway.store.leases`:
  leases, for gateways sharing a store to take turns;
* :mod:`gateway.store.ephemeral`: ephemeral accounts and the roles made for their grants;
* :mod:`gateway.store.sessions`: access sessions, their ends and seals;
* :mod:`gateway.store.connections`: connection starts and ends;
* :mod:`gateway.store.identity`: principals, tokens, roles and policies;
* :mod:`gateway.store.sso`: single sign-on's provider, group mapping and sign-ins;
* :mod:`gateway.store.refusals`: refused API calls and connections, with counts;
* :mod:`gateway.store.webhooks`: webhooks (sealed secrets) and their outbox;
* :mod:`gateway.store.mfa`: second factors (sealed secrets, used steps, failures);
* :mod:`gateway.store.projects`: per-project settings;
* :mod:`gateway.store.fleet`: where each gateway is, grants taken over on failover;
* :mod:`gateway.store.changes`: changes announced to the other gateways on the
  store (LISTEN/NOTIFY), and what a gateway reads back to reconcile;
* :mod:`gateway.store.master_keys`: master key rotation (the active version,
  who holds which, re-sealing);
* :mod:`gateway.store.audit` and :mod:`gateway.store.trail`: the audit trail.

Invariants (each module states its own as well):

* Every public method is one database transaction: a multi-row change is either
  wholly visible or not at all.
* Input is validated at the boundary (:mod:`gateway.store.validation`) and
  refused with :class:`~gateway.errors.InvalidRequest` naming the field, before
  any SQL runs.
* No record returned and no error raised contains a password.
"""

from __future__ import annotations

from gateway.errors import StoreError
from gateway.store.audit import AuditStore
from gateway.store.changes import ChangeStore
from gateway.store.connections import ConnectionStore
from gateway.store.engine import SqliteSynchronous
from gateway.store.ephemeral import EphemeralRoleStore
from gateway.store.fleet import FleetStore
from gateway.store.identity import IdentityStore
from gateway.store.leases import LeaseStore
from gateway.store.master_keys import MasterKeyStore
from gateway.store.mfa import MfaStore
from gateway.store.projects import ProjectStore
from gateway.store.refusals import RefusalStore
from gateway.store.requests import RequestStore
from gateway.store.resources import ResourceStore
from gateway.store.rotations import RotationStore
from gateway.store.schedules import ScheduleStore
from gateway.store.sessions import SessionStore
from gateway.store.sso import SsoStore
from gateway.store.webhooks import WebhookStore

__all__ = ["SqliteSynchronous", "Store", "StoreError"]


class Store(
    ResourceStore,
    SessionStore,
    ConnectionStore,
    AuditStore,
    IdentityStore,
    RefusalStore,
    RequestStore,
    SsoStore,
    WebhookStore,
    MfaStore,
    ProjectStore,
    RotationStore,
    ScheduleStore,
    LeaseStore,
    FleetStore,
    EphemeralRoleStore,
    ChangeStore,
    MasterKeyStore,
):
    """Synchronous access to the gateway's persistent state. See the module docstring.

    Open it with :meth:`open`; every method is inherited from the class of its
    aggregate.
    """
