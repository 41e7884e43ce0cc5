"""The engine's schedule replayed on the host: how many rows each decode step runs, for trace lengths
known in advance (the benchmark's budgets, EOS never drawn).  engine.Scheduler fills free slots in
arrival order, runs `check_every` steps, frees the finished rows and, once no prompt is queued, runs
the live rows in the smallest step batch that holds them.  bench_decode.py's `bound` stage prices
these rows with measured step times; tests/test_schedule.py holds the replay to the engine's own
step and row-step counts.

    from schedule import rows_per_step; rows_per_step([300, 40, 512], slots=2, check_every=16, halvings=1)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import step_batches  # noqa: E402


def rows_per_step(budgets, slots, check_every, halvings=0, refill=True, live_only=False):
    """Rows of every decode step, in order, of engine.generate(..., batch_size=slots) with
    EngineOptions(check_every, drain_steps=halvings, refill).  refill False: a whole batch of prompts
    finishes before the next starts.  live_only: count each step's unfinished rows instead of the
    batch it runs (steps with none are left out), i.e. an engine whose steps always fit their rows."""
    queue = [b for b in reversed(budgets) if b > 0]  # next prompt last
    slots = min(slots, len(queue))  # as engine.generate sizes its engine
    batches = step_batches(slots, halvings)
    left = [0] * slots      # tokens still to generate in each slot
    owned = [False] * slots
    batch, rows = slots, []
    while True:
        if queue and (refill or not any(owned)):
            for s in range(slots):
                if not owned[s] and queue:
                    left[s], owned[s] = queue.pop(), True
        if not any(owned):
            return rows
        for _ in range(check_every):
            live = sum(n > 0 for n in left)
            if live or not live_only:
                rows.append(live if live_only else batch)
            left = [max(n - 1, 0) for n in left]
        for s in range(slots):
            owned[s] = owned[s] and left[s] > 0
        if not queue:
            batch = min(b for b in batches if b >= max(sum(owned), 1))
