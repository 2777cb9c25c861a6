"""`python -m rlhf` runs the `rlhf` command."""

from rlhf.cli import main

main()
