"""``python -m harness.data.prepare``: see :mod:`harness.data.prepare.cli`."""
import sys

from harness.data.prepare.cli import main

main(sys.argv[1:])
