"""``python -m mrlora.reduce`` is the same command as ``python -m mrlora.merge``."""

import sys

from mrlora.reduce.cli import main

sys.exit(main())
