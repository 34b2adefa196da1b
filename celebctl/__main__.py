"""`python -m celebctl`."""

from .cli import main

main()
