"""``python -m qzo``: the same commands as the ``qzo`` script.

Not yet an entry for ``torchrun -m qzo``: distributed training is not built, so ``qzo train``
refuses to start when ``WORLD_SIZE`` > 1 rather than run the same job in every process.
"""

import sys

from .cli.main import main

sys.exit(main())
