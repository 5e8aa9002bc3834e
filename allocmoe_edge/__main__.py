"""`python -m allocmoe_edge` runs the CLI."""

from .cli import main

main()
