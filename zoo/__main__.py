"""`python -m zoo ...`: the `zoo` command (zoo.cli), for an environment whose scripts folder is not on PATH."""

from zoo.cli import main

main()
