"""The diffusion demo, in its seconds-long version."""

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastsearch.demos import diffusion as demo  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache):
    out_dir = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTSEARCH_CACHE", str(cache))
        threads = torch.get_num_threads()
        results = demo.run(out_dir, quick=True, progress=False)
        assert torch.get_num_threads() == threads
    return results, out_dir


def test_writes_both_figures(quick_run):
    results, out_dir = quick_run
    for name, file_name in (("scaling", "diffusion_scaling.png"), ("digits", "digits_best.png")):
        path = results["files"][name]
        assert path == out_dir / file_name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["gmm", "digits"])
def test_numbers_for_every_algorithm_and_budget(quick_run, model):
    numbers = quick_run[0][model]
    budgets, steps = numbers["budgets"], numbers["steps"]
    assert budgets == sorted(budgets) and len(budgets) >= 3
    names = ["score", "nfe"] + (["accuracy"] if model == "digits" else [])
    for name in names:
        assert set(numbers[name]) == set(demo.ALGORITHMS)
    for algorithm in demo.ALGORITHMS:
        for i, budget in enumerate(budgets):
            values = [numbers[name][algorithm][i] for name in names]
            if budget < demo.min_budget(algorithm, steps):
                assert values == [None] * len(names)
                continue
            assert 0 < numbers["nfe"][algorithm][i] <= budget
            assert isinstance(numbers["score"][algorithm][i], float)
    # random search with one candidate is the no-search sample (same seed, same sampler)
    assert numbers["score"]["random"][0] == numbers["score"]["no search"][0]
    # search beats sampling once with the whole budget spent on steps
    assert numbers["score"]["random"][-1] > numbers["score"]["no search"][-1]
    assert numbers["score"]["random"][-1] > numbers["score"]["random"][0]


def test_prints_the_tables(quick_run, cache, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSEARCH_CACHE", str(cache))
    results = demo.run(tmp_path, quick=True, progress=False)
    printed = capsys.readouterr().out
    for algorithm in demo.ALGORITHMS:
        assert algorithm in printed
    assert "NFE budget" in printed and "requested digit" in printed
    assert results["gmm"]["score"] == quick_run[0]["gmm"]["score"], "same seeds, same numbers"
    assert set(results["seconds"]) == {"digits_load", "gmm", "digits", "total"}
