"""``python -m udptunnel``: the same as the ``udptunnel`` command."""

from .cli import main

main()
