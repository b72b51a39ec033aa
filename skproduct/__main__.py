"""``python -m skproduct``: the ``skproduct`` command line (see :mod:`skproduct.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
