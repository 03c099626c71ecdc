"""``python -m cli`` runs the ``pam`` command."""

from cli.main import main

main()
