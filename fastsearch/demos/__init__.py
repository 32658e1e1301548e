"""Demos that run the searches on the embedded models and print tables and plots (``fastsearch demo``)."""
