"""`python -m surgery ...` (what `torchrun -m surgery train CONFIG` launches on every rank)."""

from surgery.cli import main

main()
