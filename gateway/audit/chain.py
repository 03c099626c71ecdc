"""Tamper evidence for the audit trail: a keyed hash chain per access session.

Role: the arithmetic behind :meth:`gateway.store.Store.append_audit` (the
writer hashes every row with :meth:`AuditChain.row_hash`) and the record
encodings that :mod:`gateway.audit.verify` checks a stored trail against. Pure:
no I/O, no database; the store feeds rows in and gets hashes out.

How the chain works:

* Every record of a session carries ``seq`` (1, 2, 3, ... per session), the hash
  of the record before it (``prev_hash``; :data:`GENESIS_HASH` for seq 1) and
  its own ``hash``: HMAC-SHA256 under the audit key over a canonical encoding of
  ``seq``, ``prev_hash`` and every field of the event. Changing any covered
  field, moving a record to another seq or session, or removing one breaks the
  chain at a place that :class:`~gateway.audit.verify.SessionVerifier` names.
* Three encodings exist; each record (or batch) names its own
  (``chain_version``), and a session's trail may hold all of them in order:

  - version 3 (written since issue 12; the format is in
    :mod:`gateway.audit.batch`): records in sealed batches, each record with a
    keyed BLAKE2b digest (:meth:`AuditChain.record_digests`), each batch with one
    HMAC over its digests, first seq and previous hash
    (:meth:`AuditChain.batch_hash`);
  - version 2 (:meth:`AuditChain.row_hash`, rows of ``audit_events``): the
    JSON array ``[2, seq, prev_hash, <the stored columns in EVENT_FIELDS
    order>]``, where ``occurred_at`` is UTC ISO-8601 text with microseconds,
    ``duration_ms`` a float, and ``parameters`` and ``detail`` are the JSON texts
    their columns hold. What is MACed is what is stored, one encoding per record.
  - version 1 (:meth:`AuditChain.record_hash`): the JSON object of
    :func:`event_fields` plus ``seq`` and ``prev_hash``, keys sorted. It costs
    twice as much to build (a sorted object, and the parameters encoded a second
    time); kept so that older records still verify.

  The encodings cannot collide: a version 1 message starts with ``{``, a
  version 2 message with ``[2,``, a batch's with :data:`_BATCH_PREFIX` and a seal
  with :data:`_SEAL_PREFIX`; record digests are BLAKE2b with their own
  personalisation.
* When a session ends, the store records the final count and head hash and an
  HMAC over ``session_id|count|head`` (:meth:`AuditChain.seal`). That catches
  what a chain alone cannot: records cut off the end.

Why a keyed MAC and not a bare hash: with SHA-256 alone, anyone with write
access to the database could edit a record and recompute every hash after it,
leaving a perfectly valid chain. The HMAC key is derived from the gateway's
master key (:func:`derive_audit_key`), which never enters the database, so such
a person cannot produce a chain that verifies. Whoever holds the master key can;
protect it accordingly.

Master key rotation (``pam gateway rotate-master-key``): the audit key is
derived from the *active* master key version, so records written after a
rotation are under a key that the retired master key does not give. An
:class:`AuditChain` holds the key new records are written under and the audit
keys of older versions (kept by the store, sealed under the active master key,
once their master key is retired); verification accepts a MAC under any of them
(:meth:`AuditChain.verifies`), so old trails verify, and so does a session whose
chain started under one version and went on under the next (each record, batch
or seal under whichever key its writer held: the version is not recorded, the
key that verifies names it). The cost is one MAC per key tried; the key that
verified last is tried first, so a trail under one version costs one MAC each.

Limits (what verification cannot see): a session removed together with all of
its records, and records cut off the end of a session that has not ended yet
(no seal exists until the end; the store that wrote them does notice at its
next append, and chains on so that the gap shows). Whoever holds a retired
master key (or its audit key, in the store, sealed) can still forge records
that verify under that version, in any trail: the version is not recorded.
``recorded_at`` (when the
store wrote the row) is not covered; ``occurred_at`` is.

Invariants: both encodings are ``json.dumps(sort_keys=True, separators=(",",
":"), ensure_ascii=False)`` encoded as UTF-8; changing either changes every hash
ever written with it, so it needs a new chain version, not an edit. Every
comparison of a hash or a seal uses :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.audit.records import AuditEvent, Parameter
from gateway.errors import ConfigError

__all__ = [
    "ACCESS_TRAIL",
    "AUDIT_KEY_BYTES",
    "AUDIT_KEY_INFO",
    "CHAIN_VERSION",
    "EVENT_FIELDS",
    "GENESIS_HASH",
    "RECORD_DIGEST_BYTES",
    "ROTATION_RECORD",
    "AuditChain",
    "canonical_encoding",
    "canonical_json",
    "derive_audit_key",
    "event_fields",
    "is_same_digest",
    "parameter_dicts",
]

#: ``prev_hash`` of the first record of every session.
GENESIS_HASH: Final = "0" * 64
#: HKDF ``info`` for the audit key (both encodings use the one key; see above).
AUDIT_KEY_INFO: Final = b"pam audit chain v1"
#: The encoding new records are written with (:meth:`AuditChain.row_hash`).
CHAIN_VERSION: Final = 2
AUDIT_KEY_BYTES: Final = 32
#: Shorter keys are refused: a MAC is only as strong as its key.
_MIN_KEY_BYTES: Final = 16
#: Domain separation: a seal can never equal a record hash (whose message is a
#: JSON object and so starts with "{").
_SEAL_PREFIX: Final = b"pam audit seal v1\x00"
#: Domain separation of a version 3 batch's MAC from records and seals.
_BATCH_PREFIX: Final = b"pam audit batch v3\x00"
#: Domain separation for the seals of session and connection rows (revision 0006).
_ROW_PREFIX: Final = b"pam audit row v1\x00"
#: Domain separation of the access trail's records (revision 0010).
_ACCESS_PREFIX: Final = b"pam access event v1\x00"
#: The access trail's seal is a seal (``seal``) under this name, which no
#: session id (32 hex digits) can be.
ACCESS_TRAIL: Final = "access-trail"
#: Domain separation of the rotation record's entries (revision 0015).
_ROTATION_PREFIX: Final = b"pam rotation record v1\x00"
#: The rotation record's seal is a seal under this name (no session id either).
ROTATION_RECORD: Final = "rotation-record"
#: BLAKE2b personalisation of version 3 record digests (16 bytes exactly).
_RECORD_PERSON: Final = b"pam audit rec v3"
#: Bytes of a version 3 record digest (BLAKE2b-128, keyed).
RECORD_DIGEST_BYTES: Final = 16

#: Event fields in their dataclass order (the keys of :func:`event_fields`);
#: ``seq`` and ``prev_hash`` are added by :meth:`AuditChain.record_hash`.
EVENT_FIELDS: Final = (
    "session_id",
    "connection_id",
    "kind",
    "occurred_at",
    "protocol",
    "sql",
    "statement_name",
    "portal_name",
    "parameters",
    "command_tag",
    "rows",
    "status",
    "sqlstate",
    "error_message",
    "duration_ms",
    "copy_direction",
    "copy_bytes",
    "detail",
)


def derive_audit_key(master_key: bytes) -> bytes:
    """The audit chain's HMAC key: HKDF-SHA256 of the master key, info ``pam audit chain v1``.

    Equal to ``SecretBox(master_key).derive_key(AUDIT_KEY_INFO)``.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=AUDIT_KEY_BYTES, salt=None, info=AUDIT_KEY_INFO
    ).derive(master_key)


def is_same_digest(a: str, b: str) -> bool:
    """Constant-time equality of two hex strings.

    Encoded first: ``compare_digest`` refuses non-ASCII ``str``, and a tampered
    column may hold anything.
    """
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def parameter_dicts(parameters: tuple[Parameter, ...] | None) -> list[dict[str, Any]] | None:
    """Parameters as the chain (and the store's JSON column) spell them."""
    if parameters is None:
        return None
    return [
        {
            "index": p.index,
            "type_oid": p.type_oid,
            "format": p.format,
            "value": p.value,
            "truncated": p.truncated,
        }
        for p in parameters
    ]


def event_fields(event: AuditEvent) -> dict[str, Any]:
    """The fields of *event* that the chain covers, as JSON values.

    The store rebuilds exactly this mapping from a stored row to verify it.
    """
    return {
        "session_id": event.session_id,
        "connection_id": event.connection_id,
        "kind": event.kind,
        "occurred_at": _iso(event.occurred_at),
        "protocol": event.protocol,
        "sql": event.sql,
        "statement_name": event.statement_name,
        "portal_name": event.portal_name,
        "parameters": parameter_dicts(event.parameters),
        "command_tag": event.command_tag,
        "rows": event.rows,
        "status": event.status,
        "sqlstate": event.sqlstate,
        "error_message": event.error_message,
        # A float column reads back 5 as 5.0; normalising here keeps the hash stable.
        "duration_ms": None if event.duration_ms is None else float(event.duration_ms),
        "copy_direction": event.copy_direction,
        "copy_bytes": event.copy_bytes,
        "detail": event.detail,
    }


def _canonical_encoder() -> Callable[[Any], str]:
    """``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)``, built once.

    ``json.dumps`` with options builds a new encoder on every call, and even a
    prebuilt ``JSONEncoder.encode`` builds its C encoder anew per call; the C
    encoder is made here once when the interpreter has one (CPython does). No
    circular-reference check: what is encoded are tuples, lists and flat dicts
    built by the gateway.
    """
    encoder = json.JSONEncoder(
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    chunks = make(
        None, encoder.default, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    return encode


_CANONICAL_JSON: Final = _canonical_encoder()


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the chain's spelling of a value (and the store's
    JSON columns', so a column holds exactly what was hashed).

    Raises ``ValueError`` for NaN and infinity.
    """
    return _CANONICAL_JSON(value)


def canonical_encoding(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes that get MACed: :func:`canonical_json` in UTF-8.

    Raises ``ValueError`` for what JSON cannot carry faithfully (NaN, infinity,
    lone surrogates).
    """
    return _CANONICAL_JSON(fields).encode("utf-8")


class _Mac(Protocol):
    """What the chain uses of an HMAC object (``hmac.HMAC`` or OpenSSL's own)."""

    def copy(self) -> _Mac: ...

    def update(self, msg: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class AuditChain:
    """Computes record hashes and session seals under one key, and checks them
    under that key or an older one (*older_keys*: the audit keys of earlier
    master key versions).

    Keys are kept only inside ``hmac`` template objects, not as attributes, and
    ``repr`` hides them.
    """

    __slots__ = ("_candidates", "_hint", "_record_template", "_template")

    def __init__(self, key: bytes, older_keys: Iterable[bytes] = ()) -> None:
        if not isinstance(key, bytes) or len(key) < _MIN_KEY_BYTES:
            raise ConfigError(f"the audit key must be at least {_MIN_KEY_BYTES} bytes")
        template = hmac.new(key, digestmod=hashlib.sha256)
        # hmac.HMAC wraps OpenSSL's HMAC object in Python methods: three Python
        # calls per record. Its ``_hmac`` (CPython, OpenSSL-backed) has the same
        # copy/update/hexdigest in C and gives the same MAC; the wrapper stays the
        # fallback where it is absent.
        self._template: _Mac = getattr(template, "_hmac", None) or template
        # Chain version 3's per-record digest: keyed BLAKE2b, one C call per
        # record (an HMAC costs three). The key lives only inside this template.
        self._record_template = hashlib.blake2b(
            key=key[:64], digest_size=RECORD_DIGEST_BYTES, person=_RECORD_PERSON
        )
        self._candidates: tuple[AuditChain, ...] = (
            self,
            *(AuditChain(older) for older in older_keys),
        )
        # Index of the candidate that verified last (a hint, so a race between
        # threads costs at most a MAC).
        self._hint = 0

    def __repr__(self) -> str:
        return "AuditChain(<key hidden>)"

    def verifying(self, compute: Callable[[AuditChain], str], stored: str) -> AuditChain | None:
        """The first chain (this one's key, or an older one's) under which
        *compute* gives *stored*; None if there is none. ``ValueError`` from
        *compute* (what cannot be encoded) is a mismatch."""
        candidates, hint = self._candidates, self._hint
        try:
            # The key that verified last first, and nothing built for it: with
            # one key (no rotation yet) this is one MAC and one comparison.
            if is_same_digest(compute(candidates[hint]), stored):
                return candidates[hint]
            for index, chain in enumerate(candidates):
                if index != hint and is_same_digest(compute(chain), stored):
                    self._hint = index
                    return chain
        except ValueError:
            return None
        return None

    @property
    def candidates(self) -> tuple[AuditChain, ...]:
        """This chain, then one per older key."""
        return self._candidates

    def verifies(self, compute: Callable[[AuditChain], str], stored: str) -> bool:
        """Whether *compute* gives *stored* under one of this chain's keys."""
        return self.verifying(compute, stored) is not None

    def _mac(self, message: bytes) -> str:
        mac = self._template.copy()
        mac.update(message)
        return mac.hexdigest()

    def record_hash(self, prev_hash: str, seq: int, event_fields: Mapping[str, Any]) -> str:
        """Hex HMAC-SHA256 of a record: its event fields plus *seq* and *prev_hash*."""
        if "seq" in event_fields or "prev_hash" in event_fields:
            raise ValueError("event_fields must not contain 'seq' or 'prev_hash'")
        return self._mac(canonical_encoding({**event_fields, "seq": seq, "prev_hash": prev_hash}))

    def row_hash(self, prev_hash: str, seq: int, values: Sequence[Any]) -> str:
        """Hex HMAC-SHA256 of a version 2 record: *values* are its stored columns
        in :data:`EVENT_FIELDS` order (see the module docstring).

        Raises ``ValueError`` for what JSON or UTF-8 cannot carry faithfully.
        """
        return self._mac(_CANONICAL_JSON([CHAIN_VERSION, seq, prev_hash, *values]).encode("utf-8"))

    def record_digests(self, session_id: str, records: Iterable[bytes]) -> bytes:
        """Chain version 3: the keyed digest of each encoded record of *session_id*,
        concatenated (:data:`RECORD_DIGEST_BYTES` each, in order).

        The session id is covered, so a record copied into another session's
        batch does not verify there.
        """
        base = self._record_template.copy()
        base.update(session_id.encode("utf-8", "surrogatepass") + b"\x00")
        digests = bytearray()
        for record in records:
            one = base.copy()
            one.update(record)
            digests += one.digest()
        return bytes(digests)

    def batch_hash(self, session_id: str, first_seq: int, prev_hash: str, digests: bytes) -> str:
        """Chain version 3: hex HMAC-SHA256 of a sealed batch, over the session,
        the first seq, the hash of what came before and every record's digest (so
        also how many records there are, and their order)."""
        header = f"{session_id}|{first_seq}|{prev_hash}|".encode("utf-8", "surrogatepass")
        return self._mac(_BATCH_PREFIX + header + digests)

    def row_mac(self, table: str, part: str, row_id: str, fields_json: str) -> str:
        """Hex HMAC over one sealed part of a session or connection row (see
        :mod:`gateway.store.sealing`): its table, part, row id and fields."""
        return self._mac(_ROW_PREFIX + f"{table}|{part}|{row_id}|{fields_json}".encode())

    def access_event_hash(self, seq: int, prev_hash: str, values: Sequence[Any]) -> str:
        """Hex HMAC of a record of the access trail: the JSON array of *seq*,
        *prev_hash* and *values* (request id, kind, actor, time as ISO text,
        state, detail as canonical JSON text), under its own prefix."""
        body = _CANONICAL_JSON([seq, prev_hash, *values]).encode("utf-8")
        return self._mac(_ACCESS_PREFIX + body)

    def rotation_hash(self, seq: int, prev_hash: str, values: Sequence[Any]) -> str:
        """Hex HMAC of an entry of the rotation record: the JSON array of *seq*,
        *prev_hash* and *values* (its fields, times as ISO text; see
        :mod:`gateway.store.rotations`), under its own prefix."""
        body = _CANONICAL_JSON([seq, prev_hash, *values]).encode("utf-8")
        return self._mac(_ROTATION_PREFIX + body)

    def seal(self, session_id: str, count: int, head: str) -> str:
        """Hex HMAC over ``session_id|count|head``: the trail's length and last hash."""
        return self._mac(_SEAL_PREFIX + f"{session_id}|{count}|{head}".encode())

    def is_valid_seal(self, session_id: str, count: int, head: str, seal: str) -> bool:
        """Whether *seal* is the seal of ``session_id|count|head`` under one of
        this chain's keys."""
        return self.verifies(lambda chain: chain.seal(session_id, count, head), seal)
