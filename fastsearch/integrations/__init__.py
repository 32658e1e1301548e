"""Adapters for other libraries (optional extras): :mod:`.diffusers`, :mod:`.transformers`."""
