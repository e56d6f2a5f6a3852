"""Entry point of ``python -m mrlora.rate`` (see mrlora.rate.cli)."""

import sys

from mrlora.rate.cli import main

sys.exit(main())
