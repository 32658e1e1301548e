"""Running a diffusers pipeline under a search: one call at a time, its images scored, what it spends counted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fastsearch.diffusion.core import Tally, check_scores, is_groupwise


def _expand_per_image(value, images: int, factor: int):
    """A per-image verifier argument (a tensor or list of ``images`` entries) for ``factor`` rows per image."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == images:
        return value.repeat_interleave(factor, dim=0)
    if isinstance(value, list | tuple) and len(value) == images:
        return type(value)(item for item in value for _ in range(factor))
    return value


class PipelineRunner:
    """Runs the pipeline, scores its images and counts what it spends in ``tally`` (per image slot).

    A context manager: while active, the scheduler's ``step`` is wrapped on the instance to count the rows it
    steps, which is the NFE count (pipeline steps x images, for any scheduler order or step count), and to read
    the initial latents of a call the pipeline draws itself (the sample of its first step, divided by
    ``init_noise_sigma``). With a ``driver`` (search over paths, FK steering), ``set_timesteps`` and ``step`` are
    handed to it, so that it steers the call step by step. Leaving the ``with`` block restores both methods
    (and the driver's changes), also when the pipeline raised.

    Args:
        pipe, verifier: the pipeline and ``verifier(images, **verifier_kwargs) -> [B]``.
        verifier_kwargs, pipe_kwargs: the arguments of every verifier and pipeline call.
        driver: steers the scheduler (see :class:`~fastsearch.integrations.diffusers.steering.Driver`); it is
            given this runner as ``driver.runner``.
        rows_per_image: each image slot's rows (paths / fk make n x M or n images per slot, consecutive), which
            share the slot's verifier arguments.

    A groupwise verifier (a rank or z-score :class:`~fastsearch.verifiers.Ensemble`) is given ``offsets=`` over
    each slot's rows. With one row per slot (random search), its members' raw scores of every call are kept in
    :attr:`member_scores` instead (``member_scores(images) -> [V, B]``), to be combined over all of a slot's
    candidates once the search has them all (``combine(scores [V, N], offsets=...)``); the scores a call returns
    are then NaN.
    """

    def __init__(self, pipe, verifier: Callable, verifier_kwargs: dict, pipe_kwargs: dict, *, driver=None,
                 rows_per_image: int = 1):
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.verifier = verifier
        self.verifier_kwargs = verifier_kwargs
        self.pipe_kwargs = pipe_kwargs
        self.rows_per_image = rows_per_image
        self.driver = driver
        if driver is not None:
            driver.runner = self
        self.tally = Tally(verifier=verifier)
        self.groupwise = is_groupwise(verifier)
        self.member_scores = []  # [V, B] per call, for a groupwise verifier with one row per slot
        self.images_per_call = None
        self.rows = 0  # latent rows stepped in the current call
        self.first_sample = None
        self._row_kwargs = {}  # verifier arguments expanded to a number of rows
        self._shadowed = {}

    def __enter__(self) -> PipelineRunner:
        scheduler = self.scheduler
        stock_step = scheduler.step
        # what the instance itself held (normally nothing: the methods come from the class), put back on exit
        self._shadowed = {name: scheduler.__dict__.get(name) for name in ("step", "set_timesteps")}

        def counted_step(*args, **kwargs):
            sample = kwargs["sample"] if "sample" in kwargs else args[2]
            if self.first_sample is None:
                self.first_sample = sample
            self.rows += sample.shape[0]
            if self.driver is not None:
                return self.driver.step(stock_step, args, kwargs)
            return stock_step(*args, **kwargs)

        scheduler.step = counted_step
        if self.driver is not None:
            stock_set_timesteps = scheduler.set_timesteps
            scheduler.set_timesteps = (
                lambda *args, **kwargs: self.driver.set_timesteps(stock_set_timesteps, args, kwargs))
        return self

    def __exit__(self, *exc_info) -> None:
        for name, shadowed in self._shadowed.items():
            if shadowed is not None:
                setattr(self.scheduler, name, shadowed)
            elif name in self.scheduler.__dict__:
                delattr(self.scheduler, name)
        if self.driver is not None:
            self.driver.restore()

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Verifier scores of ``images`` (final, or decoded mid-trajectory): [B] float32."""
        kwargs = self.verifier_kwargs
        if self.rows_per_image > 1:
            rows = images.shape[0]
            if rows not in self._row_kwargs:
                self._row_kwargs[rows] = {name: _expand_per_image(value, rows // self.rows_per_image,
                                                                  self.rows_per_image)
                                          for name, value in kwargs.items()}
            kwargs = self._row_kwargs[rows]
        if self.groupwise and self.rows_per_image == 1:
            self.member_scores.append(self.verifier.member_scores(images, **kwargs))
            scores = torch.full((images.shape[0],), float("nan"))
        elif self.groupwise:
            offsets = torch.arange(0, images.shape[0] + 1, self.rows_per_image, device=images.device)
            scores = check_scores(self.verifier(images, offsets=offsets, **kwargs), images.shape[0], "image")
        else:
            scores = check_scores(self.verifier(images, **kwargs), images.shape[0], "image")
        self.tally.verifier_calls += images.shape[0]
        return scores

    def __call__(self, latents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One pipeline call on ``latents`` (None: the pipeline draws its own).

        Returns:
            ``(images [B, ...], scores [B] float32, initial latents, NFEs per image)``.
        """
        self.rows, self.first_sample = 0, None
        kwargs = self.pipe_kwargs if latents is None else {**self.pipe_kwargs, "latents": latents}
        output = self.pipe(**kwargs)
        images = output.images if hasattr(output, "images") else output[0]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"the pipeline returned images as {type(images).__name__}; search_pipeline scores "
                            "tensors: pass output_type='pt' (or 'np')")
        if self.first_sample is None:
            raise ValueError("the pipeline ran without calling its scheduler's step; nothing to search over")
        if latents is None:
            latents = self.first_sample / self.scheduler.init_noise_sigma
        if self.images_per_call is None:
            self.images_per_call = images.shape[0]
            self.tally.slots = max(1, images.shape[0] // self.rows_per_image)
        if images.shape[0] != self.images_per_call or self.rows % self.images_per_call:
            raise ValueError(f"the pipeline returned {images.shape[0]} images and stepped {self.rows} latent rows; "
                             f"every call must make the same {self.images_per_call} images")
        self.tally.total_nfe += self.rows
        scores = self.score(images)
        return images, scores, latents, self.rows // self.images_per_call
