"""The ``pam`` command line: thin click commands over the gateway's control API."""
