"""``python -m qzo`` (also the entry for ``torchrun -m qzo``)."""

import sys

from .cli import main

sys.exit(main())
