"""The batched searches against plain-Python reference implementations, one problem at a time.

The references follow the semantics in DESIGN.md with Python loops, sorts and dicts, call the generator and
the verifier once per problem per step, and run on a deterministic fake generator whose samples depend on
the prompt (and on how often that prompt came before in the call), not on the batch. The batched search
must then make exactly the same generator calls, restricted to each problem, at every step (the same
selections step by step), and return the same candidates, scores and picks.
"""

from __future__ import annotations

import bisect
import math
import zlib

import pytest
import torch

from fastsearch.ops.noise import philox_uniforms
from fastsearch.search import Completion, beam_search, best_of_n, dvts, extract_answer, particle_filter
from fastsearch.seeding import Stream, derive_seed

DELIMITER = "\n\n"
PROBLEMS = [f"problem {i}: take {3 + i % 4} steps" for i in range(5)]


def _hash(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


class FakeGenerator:
    """Deterministic steps: ``s<depth>.<hash>``; the answer step ``answer <0-2>`` ends with EOS.

    A sample depends on (prompt, occurrence of the prompt in the call, sample index), and greedy samples
    on the prompt alone. Some steps come out empty or cut by the token limit, and some chains end early, so
    that every way a beam can complete shows up. Every call is recorded.
    """

    def __init__(self):
        self.calls: list[tuple[list[str], int, object, float]] = []

    def generate(self, prompts, *, n, stop, temperature, max_tokens, seed):
        self.calls.append((list(prompts), n, stop, temperature))
        seen: dict[str, int] = {}
        out = []
        for prompt in prompts:
            occurrence = seen.get(prompt, 0)
            seen[prompt] = occurrence + 1
            out.append([self._sample(prompt, occurrence * n + j if temperature > 0 else -1, stop is not None)
                        for j in range(n)])
        return out

    @staticmethod
    def _sample(prompt: str, key: int, one_step: bool) -> Completion:
        problem = prompt.split(DELIMITER)[0]
        length = int(problem.split("take ")[1].split()[0])
        depth = prompt.count(DELIMITER) - 1
        pieces, tokens = [], 0
        while True:
            h = _hash(prompt, key, depth)
            if h % 23 == 0 and one_step:
                return Completion("", 0, False)
            if h % 19 == 0:
                pieces.append(f"s{depth}.cut")  # ran into max_tokens: no delimiter, not finished
                return Completion(DELIMITER.join(pieces), tokens + 50, False)
            if depth + 1 >= length or h % 11 == 0:
                pieces.append(f"answer {h % 3}")
                return Completion(DELIMITER.join(pieces), tokens + 3, True)
            pieces.append(f"s{depth}.{h % 9973}")
            tokens += 5 + h % 7
            depth += 1
            if one_step:
                return Completion(pieces[0] + DELIMITER, tokens, False)


class FakeVerifier:
    """Step score: a hash of (problem, step) in [0, 1); lists or packed tensors."""

    def __init__(self, packed: bool = False):
        self.packed = packed
        self.calls = 0

    def score(self, problems, step_lists):
        self.calls += 1
        scores = [[_step_score(problem, step) for step in steps]
                  for problem, steps in zip(problems, step_lists, strict=True)]
        if not self.packed:
            return scores
        flat = torch.tensor([s for row in scores for s in row], dtype=torch.float32)
        offsets = torch.tensor([0] + [len(row) for row in scores]).cumsum(0)
        return flat, offsets


def _step_score(problem: str, step: str) -> float:
    return float(torch.tensor(_hash(problem, step) % 100003 / 100003, dtype=torch.float32))


# -- reference semantics, one problem at a time ----------------------------------------------------------


def _aggregate(scores: list[float], how: str) -> float:
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "max":
        return max(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "prod":
        return math.prod(scores)
    clipped = [min(max(s, 1e-7), 1 - 1e-7) for s in scores]
    return sum(math.log(p / (1 - p)) for p in clipped)


def _split(text: str) -> list[str]:
    parts = text.split(DELIMITER)
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    return parts


def _pick(answers: list[str], scores: list[float], vote: str) -> int:
    """DESIGN.md: argmax; majority (most members, first answer to reach the top count); weighted (largest
    score sum, the answer seen first on ties); a vote reports the winning answer's first member."""
    if vote == "none":
        best = max(scores)
        return scores.index(best)
    first = {}
    for i, answer in enumerate(answers):
        first.setdefault(answer, i)
    if vote == "majority":
        totals: dict[str, float] = {}
        for answer in answers:
            totals[answer] = totals.get(answer, 0) + 1
        top = max(totals.values())
        running: dict[str, int] = {}
        for answer in answers:
            running[answer] = running.get(answer, 0) + 1
            if running[answer] == top:
                return first[answer]
    totals = {}
    for answer, score in zip(answers, scores, strict=True):
        totals[answer] = totals.get(answer, 0.0) + score
    top = max(totals.values())
    return min(first[a] for a, total in totals.items() if total == top)


def _score(verifier, problem: str, step_lists: list[list[str]], how: str) -> list[float]:
    rows = verifier.score([problem] * len(step_lists), step_lists)
    return [_aggregate(list(row), how) for row in rows]


def _done(text: str, completion: Completion) -> bool:
    return completion.finished or not text.endswith(DELIMITER)


def _rollout(generator, prompts: list[str], steps: list[list[str]], lookahead: int) -> list[list[str]]:
    """Greedy rollouts of ``lookahead`` steps, one call per rollout step for the still-going candidates."""
    scored = [list(s) for s in steps]
    going = list(range(len(prompts)))
    prompts = list(prompts)
    for _ in range(lookahead):
        if not going:
            break
        outs = generator.generate([prompts[i] for i in going], n=1, stop=[DELIMITER], temperature=0.0,
                                  max_tokens=64, seed=0)
        still = []
        for i, out in zip(going, outs, strict=True):
            completion = out[0]
            scored[i].append(completion.text.removesuffix(DELIMITER))
            prompts[i] += completion.text
            if not _done(completion.text, completion):
                still.append(i)
        going = still
    return scored


def reference_best_of_n(generator, verifier, n, *, aggregate="last", vote="none"):
    results = []
    for problem in PROBLEMS:
        texts = [c.text for c in generator.generate([problem + DELIMITER], n=n, stop=None, temperature=0.8,
                                                    max_tokens=64, seed=0)[0]]
        scores = _score(verifier, problem, [_split(t) for t in texts], aggregate)
        answers = [extract_answer(t) for t in texts]
        results.append((texts, scores, _pick(answers, scores, vote)))
    return results


def reference_beam_search(generator, verifier, n, width, max_steps, *, lookahead=0, aggregate="last", vote="none",
                          dedup=False):
    results = []
    for problem in PROBLEMS:
        prefix = problem + DELIMITER
        beams = [(prefix, [])] * n
        completed = []  # (completion, score) in the order beams completed
        for step in range(max_steps):
            last = step == max_steps - 1
            outs = generator.generate([p for p, _ in beams], n=1, stop=None if last else [DELIMITER],
                                      temperature=0.8, max_tokens=64, seed=0)
            candidates, done = [], []
            for (prompt, steps), out in zip(beams, outs, strict=True):
                c = out[0]
                new_steps = steps + (_split(c.text) if last else [c.text.removesuffix(DELIMITER)])
                candidates.append((prompt + c.text, new_steps))
                done.append(last or _done(c.text, c))
            open_ = [i for i in range(len(candidates)) if not done[i]]
            to_score = [s for _, s in candidates]
            if lookahead and not last:
                rolled = _rollout(generator, [candidates[i][0] for i in open_], [to_score[i] for i in open_],
                                  lookahead)
                for i, r in zip(open_, rolled, strict=True):
                    to_score[i] = r
            scores = _score(verifier, problem, to_score, aggregate)
            completed += [(candidates[i][0][len(prefix):], scores[i]) for i in range(len(candidates)) if done[i]]
            if not open_:
                break
            if dedup:
                best_of_text = {}
                for i in open_:
                    text = candidates[i][0]
                    if text not in best_of_text or scores[i] > scores[best_of_text[text]]:
                        best_of_text[text] = i
                open_ = [i for i in open_ if best_of_text[candidates[i][0]] == i]
            survivors = sorted(open_, key=lambda i: -scores[i])[: n // width]  # stable: ties keep beam order
            beams = [candidates[survivors[slot % len(survivors)]] for slot in range(n)]
        kept = sorted(completed, key=lambda item: -item[1])[:n]
        texts, scores = [t for t, _ in kept], [s for _, s in kept]
        results.append((texts, scores, _pick([extract_answer(t) for t in texts], scores, vote)))
    return results


def reference_dvts(generator, verifier, n, width, max_steps, *, lookahead=0, aggregate="last", vote="none"):
    results = []
    for problem in PROBLEMS:
        prefix = problem + DELIMITER
        trees = [(prefix, [])] * (n // width)
        final: dict[int, tuple[str, float]] = {}
        open_trees = list(range(len(trees)))
        for step in range(max_steps):
            last = step == max_steps - 1
            outs = generator.generate([trees[t][0] for t in open_trees], n=width,
                                      stop=None if last else [DELIMITER], temperature=0.8, max_tokens=64, seed=0)
            cands, done = [], []  # every open tree's width candidates, tree by tree
            for t, out in zip(open_trees, outs, strict=True):
                prompt, steps = trees[t]
                for c in out:
                    cands.append((prompt + c.text,
                                  steps + (_split(c.text) if last else [c.text.removesuffix(DELIMITER)])))
                    done.append(last or _done(c.text, c))
            to_score = [s for _, s in cands]
            open_ = [i for i in range(len(cands)) if not done[i]]
            if lookahead and not last:
                rolled = _rollout(generator, [cands[i][0] for i in open_], [to_score[i] for i in open_], lookahead)
                for i, r in zip(open_, rolled, strict=True):
                    to_score[i] = r
            scores = _score(verifier, problem, to_score, aggregate)
            still = []
            for k, t in enumerate(open_trees):
                mine = scores[k * width:(k + 1) * width]
                best = k * width + mine.index(max(mine))
                if done[best]:
                    final[t] = (cands[best][0][len(prefix):], scores[best])
                else:
                    trees[t] = cands[best]
                    still.append(t)
            open_trees = still
            if not open_trees:
                break
        texts = [final[t][0] for t in sorted(final)]
        scores = [final[t][1] for t in sorted(final)]
        results.append((texts, scores, _pick([extract_answer(t) for t in texts], scores, vote)))
    return results


def _resample(log_weights: list[float], method: str, seed: int, group: int) -> list[int]:
    """fastsearch.resample's draws for one group: uniforms of the Philox stream at g * N + i."""
    count = len(log_weights)
    top = max(log_weights)
    weights = [math.exp(w - top) for w in log_weights]
    total = sum(weights)
    cdf, running = [], 0.0
    for w in weights:
        running += w / total
        cdf.append(running)
    cdf[-1] = 1.0
    uniforms = philox_uniforms(count, seed, offset=group * count).tolist()
    positions = uniforms if method == "multinomial" else [(uniforms[0] + i) / count for i in range(count)]
    return [min(bisect.bisect_right(cdf, p), count - 1) for p in positions]


def reference_particle_filter(generator, verifier, n, max_steps, *, method, threshold, seed, aggregate="last",
                              vote="none"):
    results = []
    for g, problem in enumerate(PROBLEMS):
        prefix = problem + DELIMITER
        particles = [(prefix, [], False, 0.0)] * n  # prompt, steps, done, score
        for step in range(max_steps):
            last = step == max_steps - 1
            open_ = [i for i in range(n) if not particles[i][2]]
            outs = generator.generate([particles[i][0] for i in open_], n=1, stop=None if last else [DELIMITER],
                                      temperature=0.8, max_tokens=64, seed=0)
            updated = []
            for i, out in zip(open_, outs, strict=True):
                c = out[0]
                prompt, steps, _, _ = particles[i]
                updated.append((prompt + c.text, steps + (_split(c.text) if last else [c.text.removesuffix(DELIMITER)]),
                                last or _done(c.text, c)))
            scores = _score(verifier, problem, [u[1] for u in updated], aggregate)
            for i, u, s in zip(open_, updated, scores, strict=True):
                particles[i] = (*u, s)
            if all(p[2] for p in particles):
                break
            log_weights = [math.log(p / (1 - p)) for p in (min(max(q[3], 1e-7), 1 - 1e-7) for q in particles)]
            top = max(log_weights)
            weights = [math.exp(w - top) for w in log_weights]
            ess = sum(weights) ** 2 / sum(w * w for w in weights)
            if ess < threshold * n:
                ancestors = _resample(log_weights, method, derive_seed(seed, Stream.RESAMPLE, step), g)
                particles = [particles[a] for a in ancestors]
        texts = [p[0][len(prefix):] for p in particles]
        scores = [p[3] for p in particles]
        results.append((texts, scores, _pick([extract_answer(t) for t in texts], scores, vote)))
    return results


# -- comparisons ----------------------------------------------------------------------------------------


def _per_problem_calls(calls) -> list[list[tuple]]:
    """Each batched call split by problem: [problem][call] = (prompts, n, stop, temperature)."""
    split = [[] for _ in PROBLEMS]
    for prompts, n, stop, temperature in calls:
        for g, problem in enumerate(PROBLEMS):
            mine = [p for p in prompts if p.split(DELIMITER)[0] == problem]
            if mine:
                split[g].append((mine, n, stop, temperature))
    return split


def _assert_same(result, reference, batched_calls, reference_calls):
    assert _per_problem_calls(batched_calls) == _per_problem_calls(reference_calls)
    for g, (texts, scores, pick) in enumerate(reference):
        start, end = int(result.offsets[g]), int(result.offsets[g + 1])
        assert result.candidates[start:end] == texts, f"problem {g}"
        torch.testing.assert_close(result.scores[start:end], torch.tensor(scores, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)
        assert int(result.chosen[g]) == start + pick, f"problem {g}"
        assert result.completions[g] == texts[pick]
        assert result.answers[g] == extract_answer(texts[pick])


@pytest.mark.parametrize("vote", ["none", "majority", "weighted"])
@pytest.mark.parametrize("aggregate", ["last", "min", "mean", "prod", "logit_sum"])
def test_best_of_n_matches_reference(vote, aggregate):
    batched, single = FakeGenerator(), FakeGenerator()
    result = best_of_n(PROBLEMS, batched, FakeVerifier(), n=7, aggregate=aggregate, vote=vote, max_tokens=64, seed=3)
    _assert_same(result, reference_best_of_n(single, FakeVerifier(), 7, aggregate=aggregate, vote=vote),
                 batched.calls, single.calls)


@pytest.mark.parametrize("n,width,max_steps", [(8, 2, 6), (6, 3, 3), (4, 4, 5), (5, 1, 4)])
@pytest.mark.parametrize("vote", ["none", "weighted"])
def test_beam_search_matches_reference(n, width, max_steps, vote):
    batched, single = FakeGenerator(), FakeGenerator()
    result = beam_search(PROBLEMS, batched, FakeVerifier(packed=True), n=n, beam_width=width, max_steps=max_steps,
                         vote=vote, max_tokens=64, seed=1)
    _assert_same(result, reference_beam_search(single, FakeVerifier(), n, width, max_steps, vote=vote),
                 batched.calls, single.calls)


@pytest.mark.parametrize("lookahead", [1, 2])
def test_beam_search_lookahead_matches_reference(lookahead):
    batched, single = FakeGenerator(), FakeGenerator()
    result = beam_search(PROBLEMS, batched, FakeVerifier(), n=6, beam_width=2, max_steps=5, lookahead=lookahead,
                         aggregate="mean", max_tokens=64, seed=1)
    _assert_same(result, reference_beam_search(single, FakeVerifier(), 6, 2, 5, lookahead=lookahead,
                                               aggregate="mean"), batched.calls, single.calls)
    assert any(temperature == 0.0 for *_, temperature in batched.calls)


def test_beam_search_dedup_matches_reference():
    batched, single = FakeGenerator(), FakeGenerator()
    # greedy decoding makes every copy of a beam identical: dedup keeps one of each
    result = beam_search(PROBLEMS, batched, FakeVerifier(), n=4, beam_width=2, max_steps=4, dedup=True,
                         temperature=0.0, max_tokens=64, seed=1)
    reference = reference_beam_search(_Greedy(single), FakeVerifier(), 4, 2, 4, dedup=True)
    _assert_same(result, reference, batched.calls, single.calls)


class _Greedy:
    """The fake generator asked at temperature 0 (the reference always asks at 0.8)."""

    def __init__(self, inner: FakeGenerator):
        self.inner = inner

    def generate(self, prompts, *, n, stop, temperature, max_tokens, seed):
        return self.inner.generate(prompts, n=n, stop=stop, temperature=0.0, max_tokens=max_tokens, seed=seed)


@pytest.mark.parametrize("n,width,lookahead", [(8, 2, 0), (6, 3, 1), (4, 4, 0)])
def test_dvts_matches_reference(n, width, lookahead):
    batched, single = FakeGenerator(), FakeGenerator()
    result = dvts(PROBLEMS, batched, FakeVerifier(), n=n, beam_width=width, max_steps=5, lookahead=lookahead,
                  vote="majority", max_tokens=64, seed=2)
    _assert_same(result, reference_dvts(single, FakeVerifier(), n, width, 5, lookahead=lookahead, vote="majority"),
                 batched.calls, single.calls)


@pytest.mark.parametrize("method,threshold", [("systematic", 0.5), ("multinomial", 1.0), ("systematic", 0.0)])
def test_particle_filter_matches_reference(method, threshold):
    batched, single = FakeGenerator(), FakeGenerator()
    result = particle_filter(PROBLEMS, batched, FakeVerifier(), n=6, max_steps=6, resample=method,
                             ess_threshold=threshold, vote="weighted", max_tokens=64, seed=11)
    reference = reference_particle_filter(single, FakeVerifier(), 6, 6, method=method, threshold=threshold, seed=11,
                                          vote="weighted")
    _assert_same(result, reference, batched.calls, single.calls)


def test_particle_filter_resamples_and_never_revives():
    """With ESS-triggered resampling some particles are copies; no copy of a stopped particle generates more."""
    generator = FakeGenerator()
    result = particle_filter(PROBLEMS, generator, FakeVerifier(), n=8, max_steps=6, ess_threshold=1.0, seed=5,
                             max_tokens=64)
    assert len(set(result.candidates)) < len(result.candidates)  # resampling made copies
    finished = {t for t in result.candidates}
    for prompts, *_ in generator.calls:
        for prompt in prompts:
            generated = prompt.split(DELIMITER, 1)[1]
            assert generated not in finished or generated == ""


def test_seeds_reach_the_generator():
    generator = FakeGenerator()
    seen = []

    class Recording:
        def generate(self, prompts, **options):
            seen.append(options["seed"])
            return generator.generate(prompts, **options)

    beam_search(PROBLEMS, Recording(), FakeVerifier(), n=4, beam_width=2, max_steps=3, seed=9, max_tokens=64)
    assert seen == [derive_seed(9, Stream.GENERATE, i) for i in range(len(seen))]
    assert len(set(seen)) == len(seen)
