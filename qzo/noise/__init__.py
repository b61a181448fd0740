"""Seed-replayed noise: the seed -> z contract (:mod:`.contract`, with the compiled CPU generator in
:mod:`.native`), the in-place passes every strategy and rule uses (:mod:`.passes`), and the backend choice
(:mod:`.dispatch`, the one place that picks torch or the Triton kernels of ``qzo_kernels``).

The contract's functions are this package's public names (``qzo.noise.randn``, ``qzo.noise.stream_id``).
"""

from .contract import *  # noqa: F401,F403
from .contract import __all__  # noqa: F401
