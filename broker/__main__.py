"""``python -m broker``: the same as ``gpu-broker``."""

import sys

from broker.cli import main

sys.exit(main())
