"""Embedded default models, so that every search runs anywhere with nothing downloaded.

- :mod:`fastsearch.models.gmm`: an analytic Gaussian-mixture diffusion / flow model and its verifiers.
- :mod:`fastsearch.models.digits`: a small denoiser and classifier on scikit-learn's 8x8 digits.
- :mod:`fastsearch.models.reasoning`: a *simulated* multi-step reasoning task (generator and PRM).

Import the submodules directly; none is imported here, so ``import fastsearch`` stays light.
"""
