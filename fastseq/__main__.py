"""``python -m fastseq``: the ``fastseq`` command line (see :mod:`fastseq.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
