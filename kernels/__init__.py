"""qzo's Triton kernels, installed as ``qzo_kernels``.

The folder is called ``kernels/`` in the repository but is installed under the import name
``qzo_kernels``: a top-level package named ``kernels`` would shadow the Hugging Face
``kernels`` package that transformers and bitsandbytes try to import.

One op per file. Each kernel has a pure-torch reference with the same semantics in ``qzo``
(the CPU path), and tests compare the two, on CPU through ``TRITON_INTERPRET=1``.
Triton is optional (``pip install qzo[triton]``): importing a kernel module without it
raises a clear error, and qzo falls back to the torch reference.
"""
