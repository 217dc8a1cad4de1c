"""`python -m surgery ...` (what `torchrun -m surgery train CONFIG` launches on every rank)."""

from .cli import main

main()
