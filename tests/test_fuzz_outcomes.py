"""The outcome counting of `make fuzz` (tests/fuzz_outcomes.py): each kind of outcome is recognised."""

from __future__ import annotations

import torch
from fuzz_outcomes import OPS, classify, main, make_case

import fastsearch

OK = ("ok", (torch.tensor([1.0, 2.0]),))


def test_classify_every_outcome():
    assert classify({"torch": OK, "cpu": OK}, None) == ("agrees", "")
    named = ("raised", "ValueError", "k must be at least 1, got 0")
    assert classify({"torch": named, "cpu": named}, "k")[0] == "clear error"
    # "k" inside another word does not name it; a RuntimeError is never clear
    assert classify({"torch": ("raised", "ValueError", "bad kernel"), "cpu": named}, "k")[0] == "unclear"
    assert classify({"torch": named, "cpu": ("raised", "RuntimeError", "k is bad")}, "k")[0] == "unclear"
    assert classify({"torch": named, "cpu": OK}, "k")[0] == "unclear"  # one raises, one returns
    assert classify({"torch": OK, "cpu": ("crash", "exit code -11")}, None) == ("crash", "cpu: exit code -11")
    wrong = ("ok", (torch.tensor([1.0, 2.5]),))
    assert classify({"torch": OK, "cpu": wrong}, None)[0] == "silent wrong"
    assert classify({"torch": OK, "cpu": ("ok", (torch.tensor([1.0, 2.0], dtype=torch.float64),))},
                    None)[0] == "silent wrong"  # a different dtype is wrong too
    # a mismatch named by the other argument of the pair is clear; a name of no argument is not
    offsets_named = ("raised", "ValueError", "offsets must end at T=0")
    assert classify({"torch": offsets_named, "cpu": offsets_named}, "scores", ("scores", "offsets"))[0] == \
        "clear error"
    assert classify({"torch": offsets_named, "cpu": offsets_named}, "scores", ("scores",))[0] == "unclear"
    # a valid call that raises everywhere is not a clear error: nothing was at fault
    assert classify({"torch": named, "cpu": named}, None)[0] == "unclear"


def test_cases_are_deterministic_and_cover_every_op():
    public = {name for name in fastsearch.__all__ if "backend" in str(getattr(fastsearch, name).__doc__ or "")}
    assert set(OPS) <= set(fastsearch.__all__) and len(OPS) == 17 and public
    for op in OPS:
        function, kwargs, argument, mutation = make_case(op, 1, seed=5)
        again = make_case(op, 1, seed=5)
        assert function is again[0] and argument == again[2] and mutation == again[3]
        assert argument in kwargs
        assert make_case(op, 0, seed=5)[2] is None  # every fourth case is valid


def test_a_short_run_counts_its_cases(capsys):
    status = main(["--cases-per-op", "3", "--ops", "randn,segmented_topk"])
    out = capsys.readouterr().out
    assert "6 inputs tried" in out
    assert status == 0, out
