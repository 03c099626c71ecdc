"""Access: grants and their states, the grant service, connection records, admission.

``ports`` declares what the package needs from the store (``SessionStore``);
``gateway.store.Store`` implements it and only ``gateway.app`` wires the two.
"""
