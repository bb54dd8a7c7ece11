"""``python -m harness.prepare``: see :mod:`harness.prepare.cli`."""
import sys

from .cli import main

main(sys.argv[1:])
