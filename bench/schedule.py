"""The engine's schedule replayed on the host: how many rows each decode step runs, for trace lengths
known in advance (the benchmark's budgets, EOS never drawn).  engine.Scheduler fills free slots in
arrival order, runs `check_every` steps, frees the finished rows and, once no prompt is queued, runs
the live rows in the smallest step batch that holds them.  bench_decode.py's `bound` stage prices
these rows with measured step times; tests/test_schedule.py holds the replay to the engine's own
step and row-step counts.

    from schedule import rows_per_step; rows_per_step([300, 40, 512], slots=2, check_every=16, batches=[2, 1])
"""


def rows_per_step(budgets, slots, check_every, batches, refill=True, live_only=False):
    """Rows of every decode step, in order.  batches: the engine's step batches (engine.step_batches:
    every slot first, then the drain's); refill False: a whole batch of prompts finishes before the
    next starts.  live_only: count each step's unfinished rows instead of the batch it runs, i.e. an
    engine whose steps always fit their rows exactly."""
    queue = [b for b in reversed(budgets) if b > 0]  # next prompt last
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
            rows.append(sum(n > 0 for n in left) if live_only else batch)
            left = [max(n - 1, 0) for n in left]
        for s in range(slots):
            owned[s] = owned[s] and left[s] > 0
        if not queue:
            batch = min(b for b in batches if b >= max(sum(owned), 1))
