"""The statement-level audit trail: what each client ran, paired with its outcome.

Role: the package that turns relayed protocol messages into audit events, keeps
them tamper-evident (``chain``) and hands them to the store in batches. The
event values (``records``) and the hash chain are pure; the store persists what
they produce.
"""
