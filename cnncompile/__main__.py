"""``python -m cnncompile ...`` is the ``cnncompile`` command."""

import sys

from .cli import main

sys.exit(main())
