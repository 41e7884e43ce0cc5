"""engine.generate (and engine_kernels.py, stack.py) against decode.generate_reference, sampling.py and a
from-scratch recomputation (CPU, tiny models)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import decode
import engine
import engine_kernels
from decode import generate_reference
from engine import EngineOptions
from sampling import (DecodeModels, SamplingParams, ads_score, fd_delta, filter_top_k_top_p, permute_vocab,
                      perturbed_proxies, row_uniforms, sample_from_scores)

EPS = 1e-2          # the eps the proxies are built with (SamplingParams' default)

VOCAB = 70          # ids the "tokenizer" defines: teacher logits are 80 wide, proxy logits 72
PAD = 0


def tiny_llama(vocab_size, seed, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run many times faster on one thread than on an oversubscribed pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def proxies(proxy):
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in proxy.named_parameters()}
    plus, minus, _ = perturbed_proxies(proxy, grads, EPS)
    return plus, minus


@pytest.fixture(scope="module")
def llama_teacher():
    return tiny_llama(80, seed=4)


def decode_models(teacher, proxies, eos_ids=(3,)):
    plus, minus = proxies if proxies else (None, None)
    return DecodeModels(teacher=teacher, vocab_size=VOCAB, eos_ids=list(eos_ids), pad_id=PAD, plus=plus, minus=minus,
                        eps=EPS if proxies else None)


def ragged_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 10, (n,), generator=g)]


@torch.no_grad()
def scratch_score(models, params, seq, row=0, step=0):
    """The step's score from full forwards of the whole sequence through every model (no cache)."""
    ids = torch.tensor([seq])
    logits = [m(input_ids=ids).logits[:, -1, :VOCAB] for m in (models.teacher, models.plus, models.minus) if m]
    if params.greedy:
        return logits[0].float()
    delta = fd_delta(logits[1], logits[2], params.eps) if params.uses_proxy else None
    if params.control == "permute":
        delta = permute_vocab(delta, params.seed, torch.tensor([row]), torch.tensor([step]))
    return ads_score(logits[0], delta, params.tau, params.lam)


def scratch_generate(models, params, prompts, rows, max_new):
    """The slow reference: one row at a time, every model recomputed from scratch at every step."""
    tokens, ended = [], []
    for prompt, row, budget in zip(prompts, rows, max_new):
        out, hit_eos = [], False
        while len(out) < budget:
            score = scratch_score(models, params, prompt + out, row, len(out))
            u = row_uniforms(params.seed, torch.tensor([row]), torch.tensor([len(out)]))
            tok = int(score.argmax(-1) if params.greedy else sample_from_scores(score, u, params.top_k, params.top_p))
            if tok in models.eos_ids:
                hit_eos = True
                break
            out.append(tok)
        tokens.append(out)
        ended.append(hit_eos)
    return tokens, ended


@pytest.mark.parametrize("arch,control", [("qwen2", "none"), ("llama", "none"), ("qwen2", "permute")])
def test_top_k_1_tokens_equal_from_scratch_recomputation_with_continuous_batching(arch, control, teacher,
                                                                                  llama_teacher, proxies):
    params = SamplingParams(tau=0.7, lam=0.4, top_k=1, control=control)
    models = decode_models(teacher if arch == "qwen2" else llama_teacher, proxies, eos_ids=())
    prompts, rows = ragged_prompts(7, seed=11), list(range(20, 27))
    max_new = [6, 11, 2, 9, 4, 12, 7]
    free_run, _ = scratch_generate(models, params, prompts, rows, max_new)
    # an EOS id that some row emits mid-trace, so rows end both by EOS and by budget
    models.eos_ids = [next(t[len(t) // 2] for t in free_run if len(t) > 3)]
    want = scratch_generate(models, params, prompts, rows, max_new)
    assert any(want[1]) and not all(want[1])
    got = engine.generate(models, prompts, rows, max_new, params, batch_size=3, options=EngineOptions(check_every=3))
    assert got == want


def test_prompts_of_one_length_prefill_without_a_mask_and_decode_like_the_recomputation(teacher, proxies):
    """No padding in a prefill group: plain causal attention instead of the masked path."""
    params = SamplingParams(tau=0.7, lam=0.4, top_k=1)
    models = decode_models(teacher, proxies, eos_ids=())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, VOCAB, (6,), generator=g).tolist() for _ in range(4)]
    want = scratch_generate(models, params, prompts, [0, 1, 2, 3], [5] * 4)
    assert engine.generate(models, prompts, [0, 1, 2, 3], [5] * 4, params, batch_size=4) == want


def test_sampled_tokens_equal_generate_reference(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    params = SamplingParams(tau=0.8, lam=0.3, top_p=0.95, seed=7)
    prompts, rows = ragged_prompts(9, seed=12), list(range(100, 109))
    max_new = [5, 14, 3, 10, 1, 8, 12, 6, 9]
    want = generate_reference(models, prompts, rows, max_new, params)
    got = engine.generate(models, prompts, rows, max_new, params, batch_size=4, options=EngineOptions(check_every=2))
    assert got == want


@pytest.fixture(scope="module")
def soft_models():
    """Teacher and perturbed proxies with flatter distributions than the shared fixtures' (sharpened
    2x, not 40x), so that a row decoded from wrong state or cache draws other tokens."""
    from conftest import tiny_qwen
    proxy = tiny_qwen(72, seed=1, hidden=16, sharpen=2.0)
    g = torch.Generator().manual_seed(3)
    plus, minus, _ = perturbed_proxies(proxy, {n: torch.randn(p.shape, generator=g) for n, p in proxy.named_parameters()},
                                       EPS)
    return decode_models(tiny_qwen(80, seed=0, sharpen=2.0), (plus, minus), eos_ids=(3, 9))


@pytest.mark.parametrize("layout", [{}, {"fused": False}, {"stack_models": False}, {"refill": False}])
def test_the_drain_runs_smaller_steps_on_moved_rows_and_keeps_every_token(layout, soft_models, monkeypatch):
    """Once nothing is queued the live rows move to the first slots and halved steps run them: fewer
    row-steps, the same tokens (through the stacked caches, a Stack per proxy, the Hugging Face
    modules' caches, and in the last of static batches)."""
    params = SamplingParams(tau=1.0, lam=0.5, top_p=0.95, seed=7)
    prompts, rows = ragged_prompts(11, seed=12), list(range(100, 111))
    max_new = [9, 15, 15, 7, 5, 13, 7, 13, 15, 3, 5]  # budgets (and EOS) under which two rows move at once
    want = generate_reference(soft_models, prompts, rows, max_new, params)
    real, moves = engine.Engine.shrink, []
    monkeypatch.setattr(engine.Engine, "shrink", lambda self, live: moves.append(real(self, live)) or moves[-1])
    row_steps = {}
    for halvings in (0, 1, 3):
        timings = {}
        options = EngineOptions(check_every=1, drain_steps=halvings, timings=timings, **layout)
        assert engine.generate(soft_models, prompts, rows, max_new, params, batch_size=6, options=options) == want
        row_steps[halvings] = timings["row_steps"]
        if halvings == 0:
            assert row_steps[0] == 6 * timings["steps"] and not any(moves)
    assert row_steps[3] < row_steps[1] < row_steps[0]
    assert max(len(m) for m in moves) >= 2  # rows did move, more than one at once


@pytest.mark.parametrize("halvings", [-1, True, 1.5])
def test_a_drain_step_count_that_is_not_a_whole_number_is_refused_in_one_line(halvings):
    with pytest.raises(ValueError, match="drain_steps must be a whole number of halvings"):
        EngineOptions(drain_steps=halvings)


def test_step_batches_halve_down_to_one_row():
    assert engine.step_batches(192, 4) == [192, 96, 48, 24, 12]
    assert engine.step_batches(5, 9) == [5, 3, 2, 1]
    assert engine.step_batches(7, 0) == [7]


def ragged_request(teacher, proxies):
    """models, params, prompts, rows and budgets of a request whose rows finish at different steps
    (by EOS or budget), one with no budget."""
    return (decode_models(teacher, proxies, eos_ids=(3, 9)), SamplingParams(tau=0.8, lam=0.3, top_p=0.95, seed=7),
            ragged_prompts(9, seed=12), list(range(100, 109)), [5, 14, 3, 10, 0, 8, 12, 6, 9])


@pytest.mark.parametrize("loop", ["engine", "reference"])
def test_progress_reports_every_generated_token_and_finished_row_as_they_happen(loop, teacher, proxies):
    models, params, prompts, rows, max_new = ragged_request(teacher, proxies)
    calls = []
    progress = lambda tokens, finished: calls.append((tokens, finished))  # noqa: E731
    if loop == "engine":
        tokens, _ = engine.generate(models, prompts, rows, max_new, params, batch_size=4, progress=progress,
                                    options=EngineOptions(check_every=2))
    else:
        tokens, _ = generate_reference(models, prompts, rows, max_new, params, progress)
    assert sum(t for t, _ in calls) == sum(map(len, tokens)) and sum(r for _, r in calls) == 8  # one had no budget
    assert len([r for _, r in calls if r]) > 1  # rows are reported as they finish, not all at the end


@pytest.mark.parametrize("loop", ["auto", "reference"])
def test_on_done_hands_over_each_prompt_once_as_it_finishes_with_the_returned_tokens(loop, teacher, proxies):
    models, params, prompts, rows, max_new = ragged_request(teacher, proxies)
    done, order = {}, []

    def on_done(i, tokens, ended):
        assert i not in done
        done[i] = (list(tokens), ended)
        order.append(i)
    tokens, ended = decode.generate(models, prompts, rows, max_new, params, batch_size=4, engine=loop,
                                    options=EngineOptions(check_every=2) if loop == "auto" else None, on_done=on_done)
    assert done == {i: (tokens[i], ended[i]) for i in range(9)}
    if loop == "auto":
        assert order[0] == 4 and order[1:] != sorted(order[1:])  # no budget: first; then as rows finish


def test_permutation_control_equals_generate_reference_and_breaks_the_ads_choice(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    prompts, rows = ragged_prompts(9, seed=15), list(range(9))
    max_new = [12] * 9
    # lam large against tau: the penalty decides the tokens, so its permutation must change them
    ads = SamplingParams(tau=1.0, lam=50.0, top_p=0.95, seed=5)
    control = SamplingParams(tau=1.0, lam=50.0, top_p=0.95, seed=5, control="permute")
    want = generate_reference(models, prompts, rows, max_new, control)
    got = engine.generate(models, prompts, rows, max_new, control, batch_size=4, options=EngineOptions(check_every=2))
    assert got == want
    assert got != engine.generate(models, prompts, rows, max_new, ads, batch_size=4, options=EngineOptions(check_every=2))


def test_results_do_not_depend_on_slots_or_check_interval(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    params = SamplingParams(tau=1.0, lam=0.2, top_p=0.9, seed=1)
    prompts, rows = ragged_prompts(6, seed=13), list(range(6))
    max_new = [7, 3, 9, 5, 8, 2]
    runs = [engine.generate(models, prompts, rows, max_new, params, batch_size=b, options=EngineOptions(check_every=k))
            for b, k in [(1, 1), (2, 5), (6, 2)]]
    assert runs[0] == runs[1] == runs[2]


def test_step_scores_match_from_scratch_recomputation(teacher, proxies):
    models = decode_models(teacher, proxies)
    params = SamplingParams(tau=0.9, lam=0.5, top_p=0.95, seed=2)
    prompts = ragged_prompts(3, seed=14)
    eng = engine.Engine(models, params, slots=3, max_len=20, max_new=6)
    try:
        for step in range(4):
            with engine.slot_attention_on(eng.nets), torch.no_grad():
                if step == 0:
                    eng.prefill([0, 1, 2], prompts, [0, 1, 2], [6, 6, 6])
                else:
                    eng.step()
            for s, p in enumerate(prompts):
                want = scratch_score(models, params, p + eng.out[s, :step].tolist())
                torch.testing.assert_close(eng.score[s:s + 1], want, atol=1e-4, rtol=1e-4)
    finally:
        eng.release()


def test_fused_stack_prefills_and_decodes_like_the_hugging_face_modules_and_keeps_the_models_unchanged(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    params = SamplingParams(tau=0.8, lam=0.3, top_p=0.95, seed=3)
    prompts, rows, max_new = ragged_prompts(5, seed=18), list(range(5)), [6, 2, 9, 4, 7]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        before = [m(input_ids=ids).logits for m in (teacher, *proxies)]
    unfused = engine.generate(models, prompts, rows, max_new, params, batch_size=3, options=EngineOptions(fused=False))
    fused = engine.generate(models, prompts, rows, max_new, params, batch_size=3)
    hf_prefill = engine.generate(models, prompts, rows, max_new, params, batch_size=3,
                                 options=EngineOptions(fused_prefill=False))
    one_stack_each = engine.generate(models, prompts, rows, max_new, params, batch_size=3,
                                     options=EngineOptions(stack_models=False))
    assert fused == unfused == hf_prefill == one_stack_each
    with torch.no_grad():  # the Stack re-laid the weights in place: same values, so the same outputs
        after = [m(input_ids=ids).logits for m in (teacher, *proxies)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def chi_square_critical(df, z=3.09):
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, probs):
    """Pearson statistic over the cells with expected count >= 5 (the rest pooled) and its df."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def test_token_frequencies_follow_the_ads_distribution_and_reject_lam_over_tau(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=())
    # tau and lam chosen so that ~25 tokens carry the nucleus and lam/tau moves it visibly
    params = SamplingParams(tau=2.0, lam=0.005, top_p=0.95, seed=9)
    prompt, n = [7, 21, 33, 4], 5000
    tokens, _ = engine.generate(models, [prompt] * n, list(range(n)), [1] * n, params, batch_size=1024)
    counts = torch.bincount(torch.tensor([t[0] for t in tokens]), minlength=VOCAB).double()

    def nucleus(lam_scale):
        ids = torch.tensor([prompt])
        zt, zp, zm = (m(input_ids=ids).logits[:, -1, :VOCAB] for m in (teacher, *proxies))
        score = F.log_softmax(zt, -1) / params.tau + params.lam * lam_scale * fd_delta(zp, zm, params.eps)
        return filter_top_k_top_p(torch.softmax(score, -1), 0, params.top_p)[0].double()

    with torch.no_grad():
        right, wrong = nucleus(1.0), nucleus(1.0 / params.tau)  # wrong: the reference code's lam/tau
    right, wrong = right / right.sum(), wrong / wrong.sum()
    stat, df = chi_square(counts, right)
    assert df >= 10 and stat < chi_square_critical(df)
    stat, df = chi_square(counts, wrong)
    assert stat > chi_square_critical(df)


def test_lam_0_runs_the_teacher_alone_and_equals_reference(teacher):
    models = decode_models(teacher, None, eos_ids=(3,))
    params = SamplingParams(tau=1.2, lam=0.0, top_p=0.9, seed=4)
    prompts, rows, max_new = ragged_prompts(5, seed=15), list(range(5)), [6, 2, 9, 4, 7]
    assert engine.generate(models, prompts, rows, max_new, params, batch_size=2) == \
        generate_reference(models, prompts, rows, max_new, params)


def test_tau_0_is_greedy_on_the_teacher(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3,))
    params = SamplingParams(tau=0.0, lam=0.5)
    prompts, rows, max_new = ragged_prompts(5, seed=16), list(range(5)), [6, 2, 9, 4, 7]
    got = engine.generate(models, prompts, rows, max_new, params, batch_size=3)
    assert got == scratch_generate(models, params, prompts, rows, max_new)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.95), (0, 0.5), (5, 0.9), (0, 1.0), (12, 1.0)])
def test_sort_free_sampler_equals_sampling_py(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    scores = torch.randn(64, 300, generator=g) * 3
    scores[:8] = (scores[:8] * 2).round() / 2  # many exact ties
    u = torch.rand(64, generator=g)
    assert torch.equal(engine_kernels.sample_tokens(scores, u, top_k, top_p), sample_from_scores(scores, u, top_k, top_p))


def nucleus_test_rows(vocab, seed):
    """Probability rows a top-p search can get wrong: peaked and flat ones, exact ties, one token
    with nearly all the mass, a flat row (every entry at the floor) and one with zeros."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(12, vocab, generator=g) * torch.tensor([0.1, 1, 3, 8, 20, 1, 1, 3, 0, 40, 2, 5])[:, None]
    scores[5:8] = (scores[5:8] * 2).round() / 2
    probs = torch.softmax(scores, -1)
    probs[10, vocab // 2:] = 0.0
    probs[11] *= 1e-3  # top-k'd rows need not sum to 1
    return probs


@pytest.mark.parametrize("ways", engine_kernels.SEARCH_WAY_CHOICES)
@pytest.mark.parametrize("top_p", [0.95, 0.5, 0.999, 0.01])
def test_top_p_search_keeps_the_sorted_nucleus_exactly_for_every_way_count(ways, top_p):
    probs = nucleus_test_rows(3000, seed=ways)
    floor = engine_kernels.nucleus_floor(probs, top_p, ways=ways)
    assert torch.equal(probs.view(torch.int32) > floor, filter_top_k_top_p(probs, 0, top_p) > 0)


@pytest.mark.parametrize("ways", engine_kernels.SEARCH_WAY_CHOICES)
@pytest.mark.parametrize("top_p", [0.95, 0.999, 0.9999, 0.999999])
def test_top_p_search_finds_the_exact_boundary_of_its_own_sums_with_or_without_the_lower_bound(ways, top_p):
    # this close to 1 the sorted cumsum and the search's sums can round a tail token differently,
    # so the search is held to its own definition: the highest row value (or 0) whose mass above
    # reaches the target, found by trying every one
    probs = nucleus_test_rows(800, seed=ways)
    target = top_p * engine_kernels.row_sum(probs)
    for row, p in enumerate(probs):
        bits = p.view(torch.int32)
        cand = torch.cat([torch.zeros(1, dtype=torch.int32), bits.unique()])
        mass = engine_kernels.mass_above(p.expand(len(cand), -1), cand[:, None])[:, 0]
        want = cand[mass >= target[row]].max()
        floor = engine_kernels.nucleus_floor(p[None], top_p, ways=ways)
        assert torch.equal(bits > floor[0], bits > want), row


@pytest.mark.parametrize("ways", engine_kernels.SEARCH_WAY_CHOICES)
@pytest.mark.parametrize("top_p", [0.95, 0.5, 0.99, 0.995])
def test_top_p_search_passes_close_the_bracket_from_the_lower_bound_to_any_row_max(ways, top_p):
    vocab = 151665
    passes = engine_kernels.search_passes(ways, top_p, vocab)
    for total in (1.0, 0.37, 1e-3, 2.0 ** -20):
        total = torch.tensor([[total]])
        lo = engine_kernels.nucleus_lower_bound(total, top_p, vocab)
        span = int(total.view(torch.int32)) - int(lo)   # the row's max is at most its total
        assert ways ** passes >= span
    if top_p <= 0.99:  # the bound is worth a pass: 16 ways need 7 passes, not the 8 of the whole range
        assert engine_kernels.search_passes(16, top_p, vocab) <= 7


def test_row_reductions_in_pieces_equal_whole_row_ones_and_sample_the_same_tokens():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(16, 5000, generator=g) * 4  # 3 pieces of 2048, the last one padded
    scores[0, 4999] = 40.0  # the row's maximum in the padded piece
    assert torch.equal(engine_kernels.row_max(scores), scores.amax(-1, keepdim=True))
    probs = engine_kernels.softmax_rows(scores)
    assert torch.allclose(probs, torch.softmax(scores, -1), rtol=1e-4, atol=1e-7)
    assert torch.allclose(engine_kernels.row_sum(probs), torch.ones(16, 1))
    assert torch.equal(engine_kernels.row_max(probs.view(torch.int32), 0), probs.view(torch.int32).amax(-1, keepdim=True))
    u = torch.rand(16, generator=g)
    for top_k, top_p in [(0, 0.95), (0, 0.5), (7, 0.9)]:
        assert torch.equal(engine_kernels.sample_tokens(scores, u, top_k, top_p), sample_from_scores(scores, u, top_k, top_p))


def test_inverse_cdf_in_pieces_picks_the_whole_row_scans_token_and_never_a_zero_probability_one():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(64, 5000, generator=g, dtype=torch.float64) ** 8   # 3 pieces of 2048, the last padded
    probs[probs < 0.3] = 0.0                                               # a nucleus leaves zeros
    probs[:8, 2048:] = 0.0                                                 # mass in the first piece only
    probs[8:16, :4096] = 0.0                                               # in the padded piece only
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[16:24] = 1.0                                                         # the target at the row's total
    for width in (5000, 4096):                                             # a padded last piece, or none
        p = probs[:, :width]
        cdf = p.cumsum(-1)
        want = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=width - 1)
        assert torch.equal(engine_kernels.inverse_cdf(p, u), want)
    # where a count lands on a zero (a rounded sum dipped) or past the end: the next positive entry,
    # else the last one; a row without any gets -1
    x = torch.tensor([[0.0, 0.2, 0.0, 0.0, 0.5, 0.0], [0.0, 0.2, 0.0, 0.0, 0.5, 0.0], [0.0] * 6])
    assert engine_kernels.first_positive_from(x, torch.tensor([[2], [6], [0]])).tolist() == [[4], [4], [-1]]
    # float32 rows of 151,665 whose pieces are summed in another order than the scan: rounding may move
    # a draw to a neighbour, but never onto a token of zero probability
    probs = torch.softmax(torch.randn(32, 151665, generator=g) * 3, -1)
    probs = torch.where(probs > probs.median(-1, keepdim=True).values, probs, 0.0)
    for u in (torch.rand(32, generator=g), torch.ones(32), torch.full((32,), 1 - 2 ** -24)):
        tok = engine_kernels.inverse_cdf(probs, u)
        assert (probs.gather(1, tok[:, None]) > 0).all()


def test_jvp_mode_is_refused_by_the_engine_and_decoded_by_the_reference_loop_with_a_notice(teacher, proxies, proxy, capsys):
    grads = {n: torch.randn_like(p) for n, p in proxy.named_parameters()}
    models = decode_models(teacher, proxies, eos_ids=(3,))
    models.proxy, models.grads = proxy, grads
    params = SamplingParams(tau=0.8, lam=0.3, top_p=0.95, ads_mode="jvp")
    prompts, rows, max_new = ragged_prompts(3, seed=17), [0, 1, 2], [3, 2, 4]
    with pytest.raises(ValueError, match="ads_mode=jvp"):
        engine.generate(models, prompts, rows, max_new, params, batch_size=2)
    got = decode.generate(models, prompts, rows, max_new, params, batch_size=2)
    assert "ads_mode=jvp" in capsys.readouterr().err
    want_a = generate_reference(models, prompts[:2], rows[:2], max_new[:2], params)
    want_b = generate_reference(models, prompts[2:], rows[2:], max_new[2:], params)
    assert got == (want_a[0] + want_b[0], want_a[1] + want_b[1])


def test_the_benchmarks_sampler_options_reach_the_sampler(teacher, proxies, monkeypatch):
    """EngineOptions.row_piece, .inverse_cdf, .softmax and .search_ways (the benchmark's wholerows,
    wholescan, piecesoftmax and ways16 variants) are what the step samples with, in place of the
    module constants the benchmark used to patch."""
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    params = SamplingParams(tau=0.8, lam=0.3, top_p=0.95, seed=7)
    prompts, rows, max_new = ragged_prompts(4, seed=12), list(range(4)), [5, 3, 6, 4]
    pieces = []

    def whole_row_scan(probs, u, piece):
        pieces.append(piece)
        cdf = probs.cumsum(-1)
        return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)

    softmaxes = []

    def plain_softmax(scores, piece):
        softmaxes.append(piece)
        return torch.softmax(scores.float(), -1)

    searches = []
    search = engine_kernels.nucleus_floor

    def counted_search(probs, top_p, piece, ways):
        searches.append(ways)
        return search(probs, top_p, piece, ways)

    monkeypatch.setattr(engine_kernels, "nucleus_floor", counted_search)
    options = EngineOptions(row_piece=16, inverse_cdf=whole_row_scan, softmax=plain_softmax, search_ways=4)
    got = engine.generate(models, prompts, rows, max_new, params, batch_size=2, options=options)
    assert pieces and set(pieces) == {16} and softmaxes and set(searches) == {4}
    assert got == generate_reference(models, prompts, rows, max_new, params)


@pytest.mark.parametrize("ways", [1, 3, 0, 64])
def test_a_search_way_count_the_search_does_not_offer_is_refused_in_one_line(teacher, proxies, ways):
    models = decode_models(teacher, proxies, eos_ids=(3, 9))
    with pytest.raises(ValueError, match=r"search_ways must be one of \(4, 8, 16, 32\)"):
        engine.generate(models, ragged_prompts(2, seed=3), [0, 1], [3, 3], SamplingParams(top_p=0.9), batch_size=2,
                        options=EngineOptions(search_ways=ways))


def test_an_fd_run_refuses_an_eps_other_than_the_one_its_proxies_were_built_with(teacher, proxies):
    models = decode_models(teacher, proxies, eos_ids=(3,))
    prompts, rows, max_new = ragged_prompts(2, seed=19), [0, 1], [3, 3]
    wrong = SamplingParams(tau=0.8, lam=0.3, eps=EPS / 10)
    for run in (lambda: decode.generate(models, prompts, rows, max_new, wrong, batch_size=2),
                lambda: decode.generate(models, prompts, rows, max_new, wrong, batch_size=2, engine="reference"),
                lambda: engine.generate(models, prompts, rows, max_new, wrong, batch_size=2),
                lambda: generate_reference(models, prompts, rows, max_new, wrong)):
        with pytest.raises(ValueError, match="built with eps=0.01"):
            run()
    unknown = decode_models(teacher, proxies, eos_ids=(3,))
    unknown.eps = None
    with pytest.raises(ValueError, match="DecodeModels.eps is not set"):
        decode.generate(unknown, prompts, rows, max_new, SamplingParams(tau=0.8, lam=0.3, eps=EPS), batch_size=2)
    # the proxies' eps binds only runs that use them: plain sampling and greedy ignore params.eps
    for params in (SamplingParams(tau=0.8, lam=0.0, eps=1.0), SamplingParams(tau=0.0, lam=0.3, eps=1.0)):
        assert decode.generate(unknown, prompts, rows, max_new, params, batch_size=2) == \
            generate_reference(unknown, prompts, rows, max_new, params)


def test_tuning_keeps_the_fastest_layout_whose_output_matches_the_default():
    """Layouts are timed on the GPU; here a stand-in timer reports each layout's cost, so the choice
    itself is checked: a layout that fails to build or computes something else is never picked."""
    cost = {"default": 3.0, "slower": 4.0, "fast": 1.0, "fastest_but_wrong": 0.5, "fails": 0.1}
    ran = []

    def run(layout):
        ran.append(layout)
        if layout == "fails":
            raise RuntimeError("out of resources: shared memory")
        return torch.arange(6.0) + (1.0 if layout == "fastest_but_wrong" else 0.0)

    def timer(fn):
        fn()
        return cost[ran[-1]]

    def launches(fn):  # another timer, under which the wrong-free fastest is "slower"
        fn()
        return {"slower": 0.2}.get(ran[-1], cost[ran[-1]])

    key = ("test-layouts", 6)
    engine_kernels.TUNED.pop(key, None)
    try:
        engine_kernels.tune(key, list(cost), run, timer)
        assert engine_kernels.TUNED[key] == "fast"
        ran.clear()
        engine_kernels.tune(key, list(cost), run, timer)  # tuned once per process and timer
        assert ran == []
        engine_kernels.tune(key, list(cost), run, launches)  # another timer tunes again
        assert engine_kernels.TUNED[key] == "slower" and engine_kernels.TUNED_BY[key] == "launches"
        assert engine_kernels.TUNING_LOG[-1]["timer"] == "launches"
    finally:
        engine_kernels.TUNED.pop(key, None)
        engine_kernels.TUNED_BY.pop(key, None)


def test_search_tuning_picks_the_way_count_of_the_fewest_milliseconds_per_search():
    """A pass's cost grows with its thresholds, the passes fall with them: the product decides.
    Here a stand-in timer reports a cost per pass by the thresholds the pass tested."""
    probs = torch.softmax(torch.randn(4, 3000) * 3, -1)
    per_pass = {4: 1.0, 8: 1.2, 16: 2.5, 32: 6.0}

    def timer(fn):
        return per_pass[fn().shape[1]]

    def per_search(ways):
        return engine_kernels.search_passes(ways, 0.95, 3000) * per_pass[ways]

    def fails(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    choices = engine_kernels.SEARCH_WAY_CHOICES
    keys = [("search", 4, 3000, 0.95, choices), ("search", 4, 3000, 0.95, (32,))]
    keys += [engine_kernels.mass_key(probs, w) for w in choices]
    try:
        # 14, 10, 7 and 6 passes: neither the cheapest pass (4) nor the fewest passes (32) wins
        assert [engine_kernels.search_passes(w, 0.95, 3000) for w in choices] == [14, 10, 7, 6]
        assert engine_kernels.tune_search(probs, 0.95, timer) == 8 == min(per_pass, key=per_search)
        assert engine_kernels.TUNING_LOG[-1]["key"] == str(keys[0])
        assert engine_kernels.tune_search(probs, 0.95, fails) == engine_kernels.SEARCH_WAYS  # nothing timed
        assert engine_kernels.tune_search(probs, 0.95, fails, (32,)) == 32  # nor here: the one asked for stays
    finally:
        for key in keys:
            engine_kernels.TUNED.pop(key, None)
            engine_kernels.TUNED_BY.pop(key, None)
            engine_kernels.TUNED_MS.pop(key, None)


KERNEL_CHECK = """
import torch, engine_kernels
torch.manual_seed(0)
# lengths at 1, on split boundaries (32 .. 512 keys a program) and past them; groups of 3 and 7 heads
for heads, lengths in ((6, [1, 130, 300]), (14, [64, 128, 257, 300, 33])):
    q = torch.randn(len(lengths), heads, 32)
    kc, vc = torch.randn(len(lengths), 2, 300, 32), torch.randn(len(lengths), 2, 300, 32)
    lengths = torch.tensor(lengths)
    b = engine_kernels.decode_attention_torch(q, kc, vc, lengths, 0.17)
    for config in engine_kernels.ATTENTION_CONFIGS:
        a = engine_kernels.decode_attention_triton(q, kc, vc, lengths, 0.17, config)
        assert ((a - b).norm() / b.norm()) < 1e-5, (heads, config)
# a drain step: 3 query rows reading cache rows 4, 0 and 2 of 5 (rows of two stacked models)
q, kc, vc = torch.randn(3, 6, 32), torch.randn(5, 2, 300, 32), torch.randn(5, 2, 300, 32)
lengths, rows = torch.tensor([300, 7, 130]), torch.tensor([4, 0, 2])
b = engine_kernels.decode_attention_torch(q, kc[rows], vc[rows], lengths, 0.17)
assert torch.allclose(engine_kernels.decode_attention_torch(q, kc, vc, lengths, 0.17, rows), b)
for config in engine_kernels.ATTENTION_CONFIGS[:4] + [(4096, 64, 4, 3)]:
    a = engine_kernels.decode_attention_triton(q, kc, vc, lengths, 0.17, config, rows=rows)
    assert ((a - b).norm() / b.norm()) < 1e-5, config
probs = torch.softmax(torch.randn(4, 9000) * 3, -1)
bits = probs.view(torch.int32)
middle = bits.median(-1, keepdim=True).values
# candidates spread over the row, in a bracket so narrow that most sub-blocks hold no entry inside
# it (the search's later passes), and all equal (a bracket closed on one value)
for cand in (bits[:, :16].sort(-1).values, middle + 7 * torch.arange(16, dtype=torch.int32), middle.repeat(1, 16)):
    cand = cand.contiguous()
    want = torch.stack([torch.where(bits > c[:, None], probs, 0.).sum(-1) for c in cand.unbind(-1)], -1)
    for chunk, sub, _, column in engine_kernels.MASS_CONFIGS:
        n = -(-9000 // chunk)
        part = torch.empty(4, n, 16)
        engine_kernels._mass_above[(4, n)](probs, cand, part, 9000, probs.stride(0), WAYS=16, CHUNK=chunk, SUB=sub, COLUMN=column)
        assert torch.allclose(part.sum(1), want, atol=1e-5), (chunk, sub, column)
for ways in (4, 8, 32):  # the search's other thresholds per pass
    cand = bits[:, :ways].sort(-1).values.contiguous()
    want = torch.stack([torch.where(bits > c[:, None], probs, 0.).sum(-1) for c in cand.unbind(-1)], -1)
    for chunk, sub, _, column in engine_kernels.MASS_CONFIGS[:4]:
        n = -(-9000 // chunk)
        part = torch.empty(4, n, ways)
        engine_kernels._mass_above[(4, n)](probs, cand, part, 9000, probs.stride(0), WAYS=ways, CHUNK=chunk, SUB=sub, COLUMN=column)
        assert torch.allclose(part.sum(1), want, atol=1e-5), (ways, chunk, sub, column)
# the sampler's two-pass softmax: a last chunk cut short by the row's end, -inf entries, a row that
# is -inf but for one entry
scores = torch.randn(4, 9000) * 5
scores[1, ::3] = float("-inf")
scores[2] = float("-inf")
scores[2, 8999] = 0.3
got = engine_kernels.softmax_rows_triton(scores)
assert torch.allclose(got, torch.softmax(scores, -1), rtol=1e-5, atol=1e-8) and got[2, 8999] == 1.0
# the ADS score from logits cut from wider rows (as the models' padded vocabularies are), and at lam = 0
wide = torch.randn(3, 4, 9100) * 4
zt, zp, zm = (w[:, :9000] for w in wide)
for lam in (0.3, 0.0):
    want = engine_kernels.ads_fd_score_torch(zt, zp, zm, 0.8, lam, 0.01)
    got = engine_kernels.ads_fd_score_triton(zt, zp, zm, 0.8, lam, 0.01)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), lam
    into = torch.zeros(4, 9100)  # written in place, rows wider than the vocabulary
    engine_kernels.ads_fd_score_triton(zt, zp, zm, 0.8, lam, 0.01, into[:, :9000])
    assert torch.allclose(into[:, :9000], want, rtol=1e-5, atol=1e-3) and not into[:, 9000:].any(), lam
# the prefill's elementwise kernels against the torch ops they replace (float32: the interpreter
# truncates float32 -> bfloat16 where the GPU rounds to nearest, so bfloat16 is checked on the GPU)
x, y, w = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.randn(2, 48)
for add in (None, y):
    x_out, h = engine_kernels.add_norm_triton(x, add, w, 1e-6)
    want = x if add is None else x + add
    assert torch.equal(x_out, want) and torch.allclose(h, engine_kernels.rms_norm(want, w, 1e-6), atol=1e-5)
for heads, kv_heads in ((6, 2), (5, 1)):  # 8 heads to rotate, or 6 padded to 8 with 2 masked off
    qkv, cos, sin = torch.randn(2, 5, heads + 2 * kv_heads, 32), torch.randn(5, 32), torch.randn(5, 32)
    want = engine_kernels.rotate_qk(qkv.clone(), cos, sin, heads, kv_heads)
    engine_kernels.rotate_qk_triton(qkv, cos, sin, heads + kv_heads)
    assert all(torch.equal(a, b) for a, b in zip(qkv.split([heads, kv_heads, kv_heads], dim=2), want))
gate_up = torch.randn(2, 5, 2 * 1500)  # two column blocks, the second one partly masked
want = torch.nn.functional.silu(gate_up[..., :1500]) * gate_up[..., 1500:]
assert torch.allclose(engine_kernels.silu_mul_triton(gate_up), want, atol=1e-6)
"""


def test_triton_kernels_match_torch_in_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]


def test_tuning_falls_back_to_the_first_layout_when_no_layout_can_be_timed():
    def timer(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    key = ("test-untimed", 3)
    try:
        engine_kernels.tune(key, ["first", "second"], lambda layout: torch.zeros(3), timer)
        assert engine_kernels.TUNED[key] == "first" and engine_kernels.TUNING_LOG[-1]["ms"] == {}
    finally:
        engine_kernels.TUNED.pop(key, None)
        engine_kernels.TUNED_BY.pop(key, None)
