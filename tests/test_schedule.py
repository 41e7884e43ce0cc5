"""bench/schedule.rows_per_step replays engine.Scheduler: its steps and row-steps are the engine's,
on a tiny model with EOS never drawn (every row runs its budget)."""
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine import EngineOptions
from sampling import DecodeModels, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from schedule import rows_per_step  # noqa: E402


BUDGETS = [9, 1, 14, 3, 0, 11, 6, 2, 13, 5, 8, 4, 12]


@pytest.mark.parametrize("budgets,slots,check_every,halvings,refill", [
    (BUDGETS, 5, 1, 0, True), (BUDGETS, 5, 1, 3, True), (BUDGETS, 5, 3, 2, True), (BUDGETS, 5, 2, 0, False),
    (BUDGETS, 5, 4, 2, False), ([0, 7, 3], 4, 1, 2, True)])  # more slots than prompts: the engine has fewer
def test_replayed_schedule_has_the_engines_steps_and_row_steps(teacher, budgets, slots, check_every, halvings, refill):
    models = DecodeModels(teacher=teacher, vocab_size=70, eos_ids=[], pad_id=0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 70, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (len(budgets),), generator=g)]
    timings = {}
    options = EngineOptions(check_every=check_every, drain_steps=halvings, refill=refill, timings=timings)
    tokens, _ = engine.generate(models, prompts, list(range(len(budgets))), budgets, SamplingParams(tau=1.0, seed=3),
                                slots, options=options)
    assert [len(t) for t in tokens] == budgets
    rows = rows_per_step(budgets, slots, check_every, halvings, refill)
    assert (len(rows), sum(rows)) == (timings["steps"], timings["row_steps"])


def test_live_rows_count_every_token_once_and_never_exceed_the_batch_run():
    budgets = [40, 3, 17, 512, 1, 90, 90, 6]
    run = rows_per_step(budgets, 3, 16, halvings=2)
    for every in (1, 4):
        live = rows_per_step(budgets, 3, every, halvings=2, live_only=True)
        assert sum(live) == sum(budgets)
        assert all(0 < n <= 3 for n in live) and sum(run) > sum(live)
        assert len(live) <= len(run)
