"""Triton kernels, one op family a file; installed as ``fastsearch.kernels``.

Each launcher takes the same arguments as its op schema (see csrc/README.md) and is registered as the
op ``fastsearch::<name>_triton`` by ``fastsearch.ops``. Importing a family module imports triton, so
``fastsearch`` imports them only when a Triton op first runs. Set ``TRITON_INTERPRET=1`` before the first
import to run them on CPU tensors.
"""
