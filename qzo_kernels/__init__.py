"""qzo's Triton kernels (``qzo_kernels``).

Not ``kernels``: a top-level package (or a folder at the repository root, which ``python -m``
puts on ``sys.path``) named ``kernels`` would shadow the Hugging Face ``kernels`` package that
transformers and bitsandbytes import. The kernels import nothing of qzo: they receive what
they need (keys, counters, coefficients) from ``qzo.noise.passes``.

One op per file. Each kernel has a pure-torch reference with the same semantics in ``qzo``
(the CPU path), and tests compare the two, on CPU through ``TRITON_INTERPRET=1``.
Triton is optional (``pip install qzo[triton]``): importing a kernel module without it
raises a clear error, and qzo falls back to the torch reference.
"""
