"""``python -m streamqueue_harness.node up|down|exec`` (``make node``, ``make cluster-down``)."""

import sys

from .cli import main

sys.exit(main())
