"""Credentials: secrets at rest (``secretbox``), the decrypted ones in use
(``targets``: upstream targets, SCRAM caches, the passwords the audit masks) and
``verify``. ``ports`` declares what the package needs from the store
(``AccountStore``); only ``gateway.app`` hands the store over.
"""
