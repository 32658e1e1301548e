"""The machinery the transformers PRMs share: token segments, hidden-state scoring and the incremental KV cache.

A PRM input here is a prefix (the problem in the PRM's format) followed by one token segment per step; each
segment holds the one position whose hidden state scores its step (a step tag, a separator token, the end
of an assistant-turn header). Every segment is tokenized on its own and the token ids concatenated, in the
full recomputation and in the incremental path alike, so both read exactly the same ids. (That equals
tokenizing the whole text when each segment boundary is a pre-tokenizer boundary, as it is after a special
token or a newline; the formats of :mod:`fastsearch.integrations.prms` and Math-Shepherd's tag cut there.)

Incremental scoring (``incremental=True``): a step-level search calls ``score`` with every candidate's whole
step list at every step. The PRM keeps a prefix tree of what it has run, keyed by problem text and step
texts, each node holding its step scores and where its keys/values live (a row of an earlier forward pass's
cache). A call looks up each candidate's longest cached prefix, runs only the tokens after it (all
candidates in one batch: each row's past is gathered by index from the cached rows, left-padded, with
holes in the attention mask and explicit position ids) and caches the new rows. Children of one beam share
the parent's node. After each call only the nodes on the paths of that call's candidates are kept (their
storage re-pointed to the newest rows), so memory stays bounded by the latest call's candidates.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence

import torch

from fastsearch.checks import check_choice, check_int
from fastsearch.ops.score import AGGREGATIONS, aggregate_steps, prm_scores
from fastsearch.search.types import check_step_lists


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class _Block:
    """The key/value cache of one forward pass: per layer ``(keys, values)``, each [B, heads, T, head_dim]."""

    __slots__ = ("layers", "__weakref__")

    def __init__(self, layers):
        self.layers = layers


class _Node:
    """A cached prefix: the problem (a root) or the problem and its first steps.

    ``length`` tokens from the start of the sequence end this node's last segment; they are columns
    ``start : start + length`` of row ``row`` of ``block`` (None while ``length == 0``). ``scores`` holds the
    score of every step up to this one.
    """

    __slots__ = ("parent", "children", "length", "scores", "block", "row", "start")

    def __init__(self, parent, length, scores, block, row, start):
        self.parent, self.children, self.length, self.scores = parent, {}, length, scores
        self.block, self.row, self.start = block, row, start


class SegmentPRM:
    """Base of the transformers step verifiers: prefix + one segment per step, one scored position per segment.

    A subclass sets ``head`` [C, H], ``head_bias`` [C] or None, ``positive_index`` and optionally
    ``features`` (a module applied to the hidden rows at the scored positions before the head, e.g. the
    first layers of an MLP score head), and implements ``_prefix_text(problem)`` and
    ``_segment_texts(index, step)`` -> ``(scored, tail)``: the step's text up to and including the scored
    token, and the text after it. ``marker_id`` (or None) is a token that must occur exactly once per
    segment, as the scored token, and nowhere else.

    Counters, cumulative (``reset_counters()`` zeroes them): ``tokens_processed`` (tokens run through the
    model, padding excluded), ``padded_tokens`` (new-token slots, padding included), ``past_holes`` (cached
    key/value slots masked out because a row's past is shorter than the batch's longest) and
    ``forward_passes``.
    """

    positive_index = 0
    features = None
    marker_id: int | None = None
    marker_text = ""
    suffix_text = ""
    leading_ids: tuple[int, ...] = ()

    def _setup(self, model, tokenizer, *, batch_size: int, incremental: bool, aggregate: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = check_int("batch_size", batch_size)
        if not isinstance(incremental, bool):
            raise TypeError(f"incremental must be a bool, got {type(incremental).__name__}")
        self.incremental = incremental
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATIONS)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0  # pad slots are masked out and never scored
        backbone = getattr(model, "base_model", None)
        if not isinstance(backbone, torch.nn.Module) or backbone is model:
            raise TypeError(f"model must be a transformers model with a base model (model.base_model), got "
                            f"{type(model).__name__}")
        self.backbone = backbone
        config = getattr(model, "config", None)
        self.max_length = getattr(config, "max_position_embeddings", None)
        layer_types = getattr(config, "layer_types", None) or ()
        if incremental and any(kind != "full_attention" for kind in layer_types):
            raise ValueError(f"incremental=True needs full attention in every layer; {type(model).__name__} has "
                             f"layer types {sorted(set(layer_types))}")
        forward = inspect.signature(backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._roots: dict[str, _Node] = {}
        self._lock = threading.Lock()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero ``tokens_processed``, ``padded_tokens``, ``past_holes`` and ``forward_passes``."""
        self.tokens_processed = self.padded_tokens = self.past_holes = self.forward_passes = 0

    def clear_cache(self) -> None:
        """Drop every cached key/value (incremental mode)."""
        with self._lock:
            self._roots = {}

    def cache_info(self) -> dict[str, int]:
        """What the incremental cache holds: ``nodes`` (cached prefixes: roots and steps), ``blocks`` (forward
        passes whose keys/values are still referenced) and ``bytes`` (their size, padding included)."""
        with self._lock:
            nodes, blocks, stack = 0, {}, list(self._roots.values())
            while stack:
                node = stack.pop()
                nodes += 1
                if node.block is not None:
                    blocks[id(node.block)] = node.block
                stack.extend(node.children.values())
        size = sum(t.numel() * t.element_size() for block in blocks.values() for kv in block.layers for t in kv)
        return {"nodes": nodes, "blocks": len(blocks), "bytes": size}

    # -- the StepVerifier protocol ----------------------------------------------------------------------

    def score(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Step scores of every candidate, packed.

        Args:
            problems: N problem texts (``problems[i]`` belongs to candidate i).
            step_lists: N lists of step texts (each candidate's steps so far).

        Returns:
            ``(step_scores [S] float32, offsets [N + 1] int64)`` on the CPU, S the total number of steps.
        """
        problems, step_lists = self._check(problems, step_lists)
        if self.incremental:
            with self._lock:
                per_candidate = self._score_incremental(problems, step_lists)
        else:
            per_candidate = self._score_full(problems, step_lists)
        counts = torch.tensor([0] + [len(steps) for steps in step_lists], dtype=torch.int64)
        flat = [score for scores in per_candidate for score in scores]
        return torch.tensor(flat, dtype=torch.float32), counts.cumsum(0)

    def score_candidates(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        """One aggregated score per candidate (``aggregate`` of the constructor), [N] float32; NaN without steps."""
        step_scores, offsets = self.score(problems, step_lists)
        return aggregate_steps(step_scores, offsets=offsets, method=self.aggregate, empty=float("nan"))

    def format(self, problem: str, steps: Sequence[str]) -> str:
        """The whole text of one candidate in the PRM's format. The token ids the PRM runs
        (:meth:`token_ids`) spell it but for ``suffix_text``, the text after the last step (e.g. the end of
        a chat turn), which cannot change any score: attention is causal."""
        return self._prefix_text(problem) + "".join(
            "".join(self._segment_texts(index, step)) for index, step in enumerate(steps)) + self.suffix_text

    def token_ids(self, problem: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """The token ids the PRM runs for one candidate and the positions it scores (one per step)."""
        prefix, segments = self._tokenize([problem], [list(steps)])
        ids, positions = list(prefix[0]), []
        for segment, scored in segments[0]:
            positions.append(len(ids) + scored)
            ids += segment
        return ids, positions

    # -- tokenization ---------------------------------------------------------------------------------

    def _check(self, problems, step_lists):
        return check_step_lists(problems, step_lists)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenize(self, problems, step_lists, first_steps=None, need_prefix=None):
        """Token ids of prefixes and segments, one batched tokenizer call for each kind.

        Returns ``(prefixes, segments)``: ``prefixes[i]`` the ids of candidate i's prefix (None where
        ``need_prefix[i]`` is False), ``segments[i]`` a list of ``(ids, scored position)`` for its steps
        from ``first_steps[i]`` on.
        """
        count = len(problems)
        first_steps = first_steps or [0] * count
        need_prefix = [True] * count if need_prefix is None else need_prefix
        wanted = [i for i in range(count) if need_prefix[i]]
        prefix_ids = self._encode([self._prefix_text(problems[i]) for i in wanted])
        prefixes = [None] * count
        for i, ids in zip(wanted, prefix_ids, strict=True):
            if self.marker_id is not None and self.marker_id in ids:
                raise ValueError(f"problems[{i}] contains the separator token {self.marker_text!r}")
            prefixes[i] = list(self.leading_ids) + ids
        owners, texts = [], []
        for i in range(count):
            for index in range(first_steps[i], len(step_lists[i])):
                scored, tail = self._segment_texts(index, step_lists[i][index])
                owners.append((i, index))
                texts += [scored, tail]
        encoded = self._encode(texts)
        segments = [[] for _ in range(count)]
        for k, (i, index) in enumerate(owners):
            scored, tail = encoded[2 * k], encoded[2 * k + 1]
            if not scored:
                raise ValueError(f"step_lists[{i}][{index}] gives an empty scored segment")
            if self.marker_id is not None and (scored[-1] != self.marker_id
                                               or (scored + tail).count(self.marker_id) != 1):
                raise ValueError(f"step_lists[{i}][{index}] contains the separator token {self.marker_text!r} "
                                 f"(or the tokenizer merges it with the step's text): each step must end at "
                                 f"exactly one separator")
            segments[i].append((scored + tail, len(scored) - 1))
        return prefixes, segments

    def _check_length(self, what, length: int) -> None:
        if self.max_length is not None and length > self.max_length:
            what = f"candidate {what}" if isinstance(what, int) else what
            raise ValueError(f"{what} is {length} tokens long, more than the model's "
                             f"max_position_embeddings={self.max_length}; the PRM truncates nothing")

    # -- forward passes and scoring -------------------------------------------------------------------

    def _forward(self, rows, pasts):
        """One forward pass over rows of new token ids, each after its cached past (a node, or None).

        Returns ``(hidden [B, L, H], block or None, P)`` where P is the padded past length: row i's past
        sits right-aligned in columns ``P - past_i : P`` of the new block, its new tokens at ``P : P + len``.
        """
        device = model_device(self.model)
        lengths = [len(ids) for ids in rows]
        width = max(lengths)
        past_lengths = [0 if node is None else node.length for node in pasts]
        padded_past = max(past_lengths)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), padded_past + width), dtype=torch.int64)
        for i, (row, past) in enumerate(zip(rows, past_lengths, strict=True)):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, padded_past - past:padded_past + len(row)] = 1
        positions = torch.tensor(past_lengths, dtype=torch.int64)[:, None] + torch.arange(width)
        options = {"attention_mask": mask.to(device), "position_ids": positions.to(device),
                   "use_cache": self.incremental}
        if padded_past:
            options[self._cache_arg] = self._gather(pasts, padded_past, device)
        out = self.backbone(input_ids=ids.to(device), **options)
        self.forward_passes += 1
        self.tokens_processed += sum(lengths)
        self.padded_tokens += len(rows) * width
        self.past_holes += len(rows) * padded_past - sum(past_lengths)
        block = self._block(out, len(rows), padded_past + width) if self.incremental else None
        return out.last_hidden_state, block, padded_past

    def _block(self, out, batch: int, length: int) -> _Block:
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        layers = [(layer.keys, layer.values) for layer in getattr(cache, "layers", ())
                  if isinstance(getattr(layer, "keys", None), torch.Tensor)]
        if not layers or any(keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != length
                             for keys, _ in layers):
            raise TypeError(f"{type(self.model).__name__} returned no per-layer [B, heads, T, head_dim] key/value "
                            "cache; incremental=True needs one (use incremental=False)")
        return _Block(layers)

    def _gather(self, pasts, padded_past: int, device):
        """The rows' cached keys/values, right-aligned in [B, heads, P, head_dim] per layer (holes are zeros)."""
        from transformers import DynamicCache

        template = next(node.block for node in pasts if node is not None and node.length)
        out = [tuple(torch.zeros((len(pasts), *t.shape[1:2], padded_past, t.shape[3]), dtype=t.dtype, device=device)
                     for t in kv) for kv in template.layers]
        by_block: dict[int, tuple[_Block, list[int]]] = {}
        for i, node in enumerate(pasts):
            if node is not None and node.length:
                by_block.setdefault(id(node.block), (node.block, []))[1].append(i)
        columns = torch.arange(padded_past)
        for block, members in by_block.values():
            nodes = [pasts[i] for i in members]
            src_rows = torch.tensor([node.row for node in nodes], dtype=torch.int64)
            shift = torch.tensor([node.start - padded_past + node.length for node in nodes], dtype=torch.int64)
            starts = torch.tensor([node.start for node in nodes], dtype=torch.int64)
            source = torch.maximum(columns[None, :] + shift[:, None], starts[:, None]).to(device)
            src_rows, targets = src_rows.to(device), torch.tensor(members, dtype=torch.int64, device=device)
            for (keys, values), (keys_out, values_out) in zip(block.layers, out, strict=True):
                keys_out[targets] = keys[src_rows[:, None], :, source].transpose(1, 2)
                values_out[targets] = values[src_rows[:, None], :, source].transpose(1, 2)
        return DynamicCache(out)

    def _step_scores(self, hidden, positions, counts) -> list[float]:
        """Scores at flat ``positions`` of ``hidden`` [B, L, H], via :func:`fastsearch.prm_scores`."""
        device = hidden.device
        hidden = hidden.reshape(-1, hidden.shape[-1])
        positions = torch.tensor(positions, dtype=torch.int64, device=device)
        if self.features is not None:  # the head's first layers on the S scored rows only
            hidden = self.features(hidden.index_select(0, positions)).to(self.head.dtype)
            positions = torch.arange(hidden.shape[0], device=device)
        offsets = torch.tensor([0] + counts, dtype=torch.int64, device=device).cumsum(0)
        _, steps = prm_scores(hidden.to(self.head.dtype), positions, self.head, offsets=offsets,
                              head_bias=self.head_bias, positive_index=self.positive_index, empty=float("nan"))
        return steps.cpu().tolist()

    def _score_full(self, problems, step_lists) -> list[tuple[float, ...]]:
        """Every candidate's whole sequence recomputed, batch_size candidates per forward pass."""
        results: list[tuple[float, ...]] = [()] * len(problems)
        scored = [i for i, steps in enumerate(step_lists) if steps]
        with torch.inference_mode():
            for start in range(0, len(scored), self.batch_size):
                chunk = scored[start:start + self.batch_size]
                prefixes, segments = self._tokenize([problems[i] for i in chunk], [step_lists[i] for i in chunk])
                rows, positions, counts = [], [], []
                for k, (prefix, parts) in enumerate(zip(prefixes, segments, strict=True)):
                    ids = list(prefix)
                    for segment, scored_at in parts:
                        positions.append((k, len(ids) + scored_at))
                        ids += segment
                    self._check_length(chunk[k], len(ids))
                    rows.append(ids)
                    counts.append(len(parts))
                hidden, _, _ = self._forward(rows, [None] * len(rows))
                width = hidden.shape[1]
                scores = self._step_scores(hidden, [k * width + p for k, p in positions], counts)
                at = 0
                for i, count in zip(chunk, counts, strict=True):
                    results[i] = tuple(scores[at:at + count])
                    at += count
        return results

    # -- the incremental path ---------------------------------------------------------------------------

    def _score_incremental(self, problems, step_lists) -> list[tuple[float, ...]]:
        unique: dict[tuple, int] = {}
        for i, steps in enumerate(step_lists):
            if steps:
                unique.setdefault((problems[i], steps), i)
        with torch.inference_mode():
            self._add_roots(sorted({problems[i] for i in unique.values()} - self._roots.keys()))
            finals: dict[int, _Node] = {}
            pending = []  # (candidate, deepest cached node, steps already cached)
            for i in unique.values():
                node, depth = self._roots[problems[i]], 0
                for step in step_lists[i]:
                    child = node.children.get(step)
                    if child is None:
                        break
                    node, depth = child, depth + 1
                if depth == len(step_lists[i]):
                    finals[i] = node
                else:
                    pending.append((i, node, depth))
            pending.sort(key=lambda item: item[1].length)  # similar past lengths share a batch: less padding
            for start in range(0, len(pending), self.batch_size):
                finals.update(self._extend(problems, step_lists, pending[start:start + self.batch_size]))
        self._keep(finals.values())
        return [finals[unique[(problems[i], steps)]].scores if steps else () for i, steps in enumerate(step_lists)]

    def _add_roots(self, problems: list[str]) -> None:
        """Cache the prefix of every new problem (one row each), so that all its candidates extend it."""
        prefixes, _ = self._tokenize(problems, [()] * len(problems))
        for problem, ids in zip(problems, prefixes, strict=True):
            self._check_length(f"the prefix of problem {problem[:40]!r}", len(ids))
            if not ids:
                self._roots[problem] = _Node(None, 0, (), None, 0, 0)
        todo = [(problem, ids) for problem, ids in zip(problems, prefixes, strict=True) if ids]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            _, block, _ = self._forward([ids for _, ids in chunk], [None] * len(chunk))
            for row, (problem, ids) in enumerate(chunk):
                self._roots[problem] = _Node(None, len(ids), (), block, row, 0)

    def _extend(self, problems, step_lists, chunk) -> dict[int, _Node]:
        """One forward pass for a chunk of candidates: their uncached steps after their cached nodes."""
        candidates = [i for i, _, _ in chunk]
        _, segments = self._tokenize([problems[i] for i in candidates], [step_lists[i] for i in candidates],
                                     first_steps=[depth for _, _, depth in chunk],
                                     need_prefix=[False] * len(chunk))
        rows, positions, counts = [], [], []
        for k, ((i, node, _), parts) in enumerate(zip(chunk, segments, strict=True)):
            ids = []
            for segment, scored_at in parts:
                positions.append((k, len(ids) + scored_at))
                ids += segment
            self._check_length(i, node.length + len(ids))
            rows.append(ids)
            counts.append(len(parts))
        hidden, block, padded_past = self._forward(rows, [node for _, node, _ in chunk])
        width = hidden.shape[1]
        scores = self._step_scores(hidden, [k * width + p for k, p in positions], counts)
        finals, at = {}, 0
        for row, ((i, node, depth), parts) in enumerate(zip(chunk, segments, strict=True)):
            start, length = padded_past - node.length, node.length
            for offset, (segment, _) in enumerate(parts):
                length += len(segment)
                step = step_lists[i][depth + offset]
                child = node.children.get(step)
                if child is None:
                    child = _Node(node, length, node.scores + (scores[at],), block, row, start)
                    node.children[step] = child
                node, at = child, at + 1
            finals[i] = node
        return finals

    def _keep(self, finals) -> None:
        """Keep only the nodes on the latest call's paths; point each at the newest row holding its tokens."""
        kept: dict[int, _Node] = {}
        for leaf in finals:
            node = leaf
            while node is not None and id(node) not in kept:
                kept[id(node)] = node
                if node is not leaf and leaf.block is not None and node.length:
                    node.block, node.row, node.start = leaf.block, leaf.row, leaf.start
                node = node.parent
        for node in kept.values():
            node.children = {step: child for step, child in node.children.items() if id(child) in kept}
        self._roots = {problem: root for problem, root in self._roots.items() if id(root) in kept}
