"""`python -m dyn` is the `dyn` command."""

from dyn.cli.main import main

main()
