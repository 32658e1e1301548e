"""Dataset scale-out with Ray Data: one search per actor, each actor a model replica, problems streamed in
batches. Run with a Ray installation (a local cluster starts by itself):

    pip install 'ray[data]' && python -m fastsearch.demos.ray_dataset

(ray is not a dependency of fastsearch; `make ray-test`, which `.ci/run` runs, tests this in its own
environment, tests/ray.)

Checks that the answers equal one process's beam search over the whole dataset with the same seed (each problem's
search is independent of the other problems of its batch).
"""

from __future__ import annotations

from fastsearch.models import reasoning
from fastsearch.search import beam_search

SEARCH = {"n": 8, "beam_width": 2, "max_steps": 8, "seed": 0, "answer_fn": reasoning.extract_answer}


class SearchActor:
    """Holds one generator and verifier (on a real cluster: one LLM and PRM replica per GPU actor)."""

    def __init__(self):
        self.generator, self.verifier = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()

    def __call__(self, batch: dict) -> dict:
        problems = [str(text) for text in batch["problem"]]
        result = beam_search(problems, self.generator, self.verifier, **SEARCH)
        return {"problem": problems, "answer": result.answers}


def run(num_problems: int = 16, actors: int = 2) -> tuple[list[str], list[str]]:
    """Beam search over ``num_problems`` simulated problems on Ray Data with ``actors`` actors, and the same search
    in this process: ``(ray_answers, one_process_answers)``, both in problem order."""
    import ray

    ray.init(num_cpus=actors, include_dashboard=False, ignore_reinit_error=True)
    try:
        problems = [p.text for p in reasoning.make_problems(num_problems, seed=0)]
        dataset = ray.data.from_items([{"problem": text} for text in problems])
        rows = dataset.map_batches(SearchActor, batch_size=4, concurrency=actors, num_cpus=1).take_all()
    finally:
        ray.shutdown()
    by_problem = {row["problem"]: row["answer"] for row in rows}
    alone = beam_search(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), **SEARCH).answers
    return [by_problem[text] for text in problems], alone


def main() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise SystemExit("this demo needs Ray: pip install 'ray[data]'") from error
    on_ray, alone = run()
    assert on_ray == alone, "Ray's answers differ from one process's"
    print(f"Ray Data, 2 actors: {len(on_ray)} problems searched, answers equal one process's: {alone}")


if __name__ == "__main__":
    main()
