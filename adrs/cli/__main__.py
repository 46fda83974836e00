"""`python -m adrs.cli`: the same as the `adrs` console script."""
from adrs.cli import main

main()
