"""``python -m udptunnel``: the same as the ``udptunnel`` command."""

from .launch import main

main()
