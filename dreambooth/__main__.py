"""``python -m dreambooth``: see :mod:`dreambooth.cli`."""

import sys

from .cli import main

sys.exit(main())
