"""``python -m streamqueue.monitor``: the same as the ``streamqueue-monitor`` script."""

import sys

from .cli import main

sys.exit(main())
