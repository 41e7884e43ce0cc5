"""The ADS score, the sampler, the perturbed proxies (sampling.py) and the reference decode loop
(decode.generate_reference) that applies them."""
import math

import pytest
import torch
import torch.nn.functional as F

import sampling
from conftest import tiny_qwen
from decode import generate_reference

VOCAB = 64  # ids the "tokenizer" defines; both models have wider, padded logits


def loss_gradient(model, ids):
    """A realistic g: the gradient of the model's mean NLL on a token sequence."""
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1, :VOCAB]
    F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_ads_score_matches_an_independent_computation(teacher, proxy):
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 7))
    tau, lam, eps = 0.8, 0.3, 1e-2
    g = loss_gradient(proxy, ids)
    plus, minus, _ = sampling.perturbed_proxies(proxy, g, eps)
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[:, -1, :VOCAB].double()
        zp = plus(input_ids=ids).logits[:, -1, :VOCAB].double()
        zm = minus(input_ids=ids).logits[:, -1, :VOCAB].double()
    # by hand: log p_T / tau + lam * (log p+ - log p-) / (2 eps), lam NOT divided by tau
    lp = lambda z: z - torch.logsumexp(z, -1, keepdim=True)
    expected = lp(zt) / tau + lam * (lp(zp) - lp(zm)) / (2 * eps)
    got = sampling.ads_score(zt.float(), sampling.fd_delta(zp.float(), zm.float(), eps), tau, lam)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)
    assert (got - sampling.ads_score(zt.float(), None, tau, 0.0)).abs().max() > 1e-3  # the penalty acts


def _fd_vs_jvp_cosine(model, g, ids, eps):
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)
    exact = sampling.exact_delta(model, g, ids, mask, pos, VOCAB)
    plus, minus, _ = sampling.perturbed_proxies(model, g, eps)
    with torch.no_grad():
        fd = sampling.fd_delta(plus(input_ids=ids).logits[:, -1, :VOCAB], minus(input_ids=ids).logits[:, -1, :VOCAB], eps)
    return F.cosine_similarity(fd.flatten(), exact.flatten(), dim=0).item(), exact


def test_finite_differences_agree_with_the_exact_jvp():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    model = tiny_qwen(vocab_size=72, seed=1, hidden=16, sharpen=4.0)
    g = loss_gradient(model, ids)
    cos, exact = _fd_vs_jvp_cosine(model, g, ids, 1e-2)
    assert cos > 0.99, cos
    # the direction carries information: a random direction's derivative is not parallel to it
    g_rand = {n: torch.randn_like(v) * v.norm() / math.sqrt(v.numel()) for n, v in g.items()}
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)
    other = sampling.exact_delta(model, g_rand, ids, mask, pos, VOCAB)
    assert F.cosine_similarity(other.flatten(), exact.flatten(), dim=0).item() < 0.9


def test_finite_differences_need_a_smaller_eps_when_the_proxy_is_sharp(proxy):
    # logits x40 and |g| ~ 50: eps = 1e-2 moves the weights far out of the linear regime,
    # eps = 1e-4 recovers the derivative (the App. C comparison depends on eps * |g|)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    g = loss_gradient(proxy, ids)
    assert _fd_vs_jvp_cosine(proxy, g, ids, 1e-2)[0] < 0.9
    assert _fd_vs_jvp_cosine(proxy, g, ids, 1e-4)[0] > 0.999


def test_eps_auto_picks_a_smaller_eps_for_a_cold_proxy_than_for_a_warm_one():
    # cold: a sharp proxy that never saw the sequences (|g| ~ 40, curvature large along g: truncation
    # error dominates down to small eps); warm: the same proxy fitted to them (|g| small: a small eps
    # leaves FD to float32 round-off).  App. B's procedure must find each one's own eps.
    import copy
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 24))
    cold = tiny_qwen(vocab_size=72, seed=1, hidden=32)
    warm = copy.deepcopy(cold).train()
    opt = torch.optim.Adam(warm.parameters(), lr=1e-2)
    for _ in range(40):
        logits = warm(input_ids=ids).logits[:, :-1, :VOCAB]
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    warm.eval()
    batches = sampling.check_positions([(row.tolist(), row.tolist()) for row in ids], 32)
    assert sum(len(pos) for _, pos in batches) >= 32
    chosen = {}
    for name, model in (("cold", cold), ("warm", warm)):
        eps, table = sampling.choose_eps(model, loss_gradient(model, ids), batches, VOCAB)
        assert [row["eps"] for row in table] == sampling.EPS_GRID
        best = min(row["fd_rel_error_median"] for row in table)
        assert next(row for row in table if row["eps"] == eps)["fd_rel_error_median"] == best < 0.05
        chosen[name] = eps
    assert chosen["cold"] < chosen["warm"], chosen


def test_fd_quality_is_perfect_for_equal_deltas_and_flags_unrelated_ones():
    torch.manual_seed(0)
    exact = torch.randn(10, VOCAB)
    same = sampling.fd_quality(exact.clone(), exact)
    assert same["fd_cosine_median"] == pytest.approx(1) and same["fd_rel_error_median"] == pytest.approx(0)
    other = sampling.fd_quality(torch.randn(10, VOCAB), exact)
    assert other["fd_cosine_median"] < 0.5 and other["fd_rel_error_median"] > 1 and other["fd_positions"] == 10


def test_perturbation_reports_weights_rounded_away_in_half_precision(proxy):
    half = tiny_qwen(vocab_size=72, seed=1, hidden=16).half()
    g = {n: torch.full_like(p, 1e-5, dtype=torch.float32) for n, p in half.named_parameters()}
    _, _, diag = sampling.perturbed_proxies(half, g, 1e-2)  # a step of 1e-7 on weights of ~2e-2
    assert diag["proxy_dtype"] == "float16"
    assert diag["frac_weights_changed_plus"] < 0.05
    g32 = {n: torch.full_like(p, 1e-5) for n, p in proxy.named_parameters()}
    _, _, diag32 = sampling.perturbed_proxies(proxy, g32, 1e-2)
    assert diag32["frac_weights_changed_plus"] > 0.95
    assert diag32["grad_rms"] == pytest.approx(1e-5, rel=1e-3)


def test_row_uniforms_are_a_pure_function_of_seed_row_and_step():
    rows, steps = torch.arange(1000), torch.full((1000,), 5)
    u = sampling.row_uniforms(0, rows, steps)
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(u[10:20], sampling.row_uniforms(0, rows[10:20], steps[10:20]))
    assert not torch.equal(u, sampling.row_uniforms(1, rows, steps))
    assert not torch.equal(u, sampling.row_uniforms(0, rows, steps + 1))
    assert abs(u.mean().item() - 0.5) < 0.03  # roughly uniform


def test_permutation_control_shuffles_each_row_by_seed_row_and_step():
    delta = torch.randn(64, 50)
    rows, steps = torch.arange(64), torch.full((64,), 3)
    perm = sampling.permute_vocab(delta, 0, rows, steps)
    assert torch.equal(perm.sort(-1).values, delta.sort(-1).values)  # same values, other tokens
    assert torch.equal(perm[5:9], sampling.permute_vocab(delta[5:9], 0, rows[5:9], steps[5:9]))
    for other in (sampling.permute_vocab(delta, 1, rows, steps), sampling.permute_vocab(delta, 0, rows, steps + 1),
                  sampling.permute_vocab(delta, 0, rows + 1, steps)):
        assert (other != perm).any(-1).all()
    # a fixed token's penalty lands anywhere: over many rows its source column is near uniform
    same = delta[:1].expand(4096, -1)
    src = sampling.permute_vocab(torch.arange(50.0).expand(4096, -1), 0, torch.arange(4096), torch.zeros(4096))
    assert torch.equal(sampling.permute_vocab(same, 0, torch.arange(4096), torch.zeros(4096))[:, 0],
                       delta[0, src[:, 0].long()])
    counts = torch.bincount(src[:, 0].long(), minlength=50).float()
    assert counts.min() > 40 and counts.max() < 130  # expected 82 per column


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = sampling.filter_top_k_top_p(probs, top_p=0.8) > 0
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling.filter_top_k_top_p(probs, top_p=0.81) > 0
    assert kept.tolist() == [[True, True, True, False]]
    kept = sampling.filter_top_k_top_p(probs, top_k=1) > 0
    assert kept.tolist() == [[True, False, False, False]]


def test_inverse_cdf_sampling_follows_the_filtered_distribution():
    scores = torch.log(torch.tensor([0.1, 0.6, 0.05, 0.25])).expand(20000, 4)
    u = sampling.row_uniforms(3, torch.arange(20000), torch.zeros(20000, dtype=torch.long))
    tok = sampling.sample_from_scores(scores, u, top_p=0.8)
    freq = torch.bincount(tok, minlength=4).float() / 20000
    # nucleus at 0.8 keeps {0.6, 0.25} -> renormalised 0.706 / 0.294
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.6 / 0.85, 0.0, 0.25 / 0.85]), atol=0.015, rtol=0)


def _models(teacher, proxy, eps=1e-2, with_proxy=True):
    g = loss_gradient(proxy, torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5)))
    models = sampling.DecodeModels(teacher=teacher, vocab_size=VOCAB, eos_ids=[2], pad_id=0, eps=eps)
    if with_proxy:
        models.plus, models.minus, _ = sampling.perturbed_proxies(proxy, g, eps)
        models.proxy, models.grads = proxy, g
    return models


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_tau_zero_is_greedy_on_the_teacher(teacher, proxy):
    models = _models(teacher, proxy, with_proxy=False)
    outs, _ = generate_reference(models, PROMPTS, [0, 1, 2], [6, 6, 6], sampling.SamplingParams(tau=0.0))
    for prompt, out in zip(PROMPTS, outs):  # compare with argmax of a full recomputation, one row at a time
        ids = list(prompt)
        for tok in out:
            with torch.no_grad():
                ids.append(int(teacher(input_ids=torch.tensor([ids])).logits[0, -1, :VOCAB].argmax()))
            assert ids[-1] == tok


def test_reference_decode_does_not_depend_on_batch_composition(teacher, proxy):
    models = _models(teacher, proxy)
    params = sampling.SamplingParams(tau=1.0, lam=0.5, eps=1e-2, top_p=0.95, seed=7)
    together, _ = generate_reference(models, PROMPTS, [0, 1, 2], [8, 5, 8], params)
    alone = [generate_reference(models, [p], [i], [n], params)[0][0]
             for i, (p, n) in enumerate(zip(PROMPTS, [8, 5, 8]))]
    assert together == alone
    assert [len(o) for o in together] == [8, 5, 8] or any(len(o) < 8 for o in together)


def test_gradient_validation_names_missing_extra_and_misshaped(proxy):
    g = {n: torch.zeros_like(p) for n, p in proxy.named_parameters()}
    first = next(iter(g))
    del g[first]
    g["bogus.weight"] = torch.zeros(2)
    name = "lm_head.weight"
    g[name] = torch.zeros(3, 3)
    with pytest.raises(SystemExit) as e:
        sampling.check_gradient_matches(g, proxy, "g.safetensors")
    msg = str(e.value)
    assert f"missing (first {first})" in msg and "extra (first bogus.weight)" in msg
    assert f"mis-shaped (first {name}: (3, 3)" in msg


@pytest.mark.parametrize("control, mode", [("none", "fd"), ("permute", "fd"), ("none", "jvp")])
def test_token_terms_recompute_the_score_the_sampler_chose_by(teacher, proxy, control, mode):
    """The trace viewer's per-token data: with top_k = 1 the sampler takes the best score at every step,
    so the recomputed teacher log-prob plus ADS term must rank each chosen token first."""
    models = _models(teacher, proxy)
    params = sampling.SamplingParams(tau=1.0, lam=20.0, eps=1e-2, top_k=1, seed=3, control=control, ads_mode=mode)
    outs, _ = generate_reference(models, PROMPTS, [0, 1, 2], [8, 8, 8], params)
    moved = 0
    for row, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        logprobs, ads = sampling.token_terms(models, params, prompt, out, row)
        chosen = torch.tensor(out)
        assert logprobs.shape == ads.shape == (len(out), VOCAB)
        assert torch.equal((logprobs / params.tau + ads).argmax(-1), chosen)
        moved += int((logprobs.argmax(-1) != chosen).sum())
    assert moved > 0  # the ADS term decided some choices, so the check above depends on it
