"""`python -m atelier.cli`: the same as the `atelier` script."""

from atelier.cli import main

main()
