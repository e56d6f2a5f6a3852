"""``python -m mrlora.merge``: the Reduce step's command line (see ``mrlora.reduce.cli``)."""

import sys

from mrlora.reduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
