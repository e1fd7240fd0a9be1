"""``python -m streamqueue.kubectl_sq``: the same as the ``kubectl-sq`` script (the krew shim runs it)."""

import sys

from .cli import main

sys.exit(main())
