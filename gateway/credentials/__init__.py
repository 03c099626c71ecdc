"""Credentials: secrets at rest (``secretbox``), the decrypted ones in use
(``targets``: upstream targets, SCRAM caches, the passwords the audit masks),
``verify``, and ``rotation`` (with ``statements`` and ``records``: generated
passwords set upstream as SCRAM secrets, crash-safe). ``ports`` declares what the
package needs from the store (``AccountStore``, ``RotationStore``); only
``gateway.app`` hands the store over.
"""
