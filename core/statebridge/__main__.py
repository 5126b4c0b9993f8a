"""``python -m statebridge`` (and ``torchrun -m statebridge``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
