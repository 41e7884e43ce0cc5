"""gentraces.py on the tiny assets: outputs, determinism across batch sizes and processes, and one
clear error (with nothing written) for every bad input. The tests on the trained tiny assets are slow
(their build trains a teacher); the fast tier runs the stage on untrained models (the last tests)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import gentraces
import sampling
import trace_fixtures as tf

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def base_args(assets, exp_dir, **kw):
    args = {"teacher": assets / "teacher", "proxy": assets / "proxy", "data_dir": assets / "data",
            "exp_dir": exp_dir, "max_length": 160, "max_prompt_length": 96, "data_split": "gsm8k_test",
            "max_samples": 24, "batch_size": 8, "trace_name": "t", **kw}
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def holdout(tiny_assets, tmp_path_factory):
    """Greedy teacher traces: what save_grad.py reads, and where the FD check measures."""
    exp = tmp_path_factory.mktemp("holdout")
    gentraces.main(base_args(tiny_assets, exp, tau=0, data_split="gsm8k_holdout", max_samples=8, trace_name="holdout"))
    return exp / "traces" / "holdout"


def save_gradient(g, path, traces):
    save_file(g, str(path), metadata={"traces": str(traces)})  # save_grad.py names its traces so
    return path


@pytest.fixture(scope="module")
def grad_file(tiny_assets, holdout, tmp_path_factory):
    """A gradient with the proxy's names and shapes (values are irrelevant to most tests)."""
    proxy = AutoModelForCausalLM.from_pretrained(tiny_assets / "proxy")
    torch.manual_seed(0)
    g = {n: torch.randn_like(p) * 1e-2 for n, p in proxy.named_parameters()}
    return save_gradient(g, tmp_path_factory.mktemp("grad") / "g.safetensors", holdout), g


def load_rows(exp_dir, name="t"):
    return list(datasets.load_from_disk(str(Path(exp_dir) / "traces" / name)))


@pytest.mark.slow
def test_outputs_sidecar_and_registry(tiny_assets, tmp_path):
    gentraces.main(base_args(tiny_assets, tmp_path, tau=0))
    traces = tmp_path / "traces"
    rows = load_rows(tmp_path)
    assert len(rows) == 24 and [r["idx"] for r in rows] == list(range(24))
    assert all(r["prompt"].endswith("<｜Assistant｜>") and r["completion"].startswith("<think>\n") for r in rows)
    assert all(r["trace"] == r["prompt"] + r["completion"] for r in rows)
    side = yaml.safe_load((traces / "t.yaml").read_text())
    assert side["config"]["tau"] == 0 and side["stats"]["n"] == 24
    assert 0 <= side["stats"]["af_accuracy"] <= 1
    assert (traces / "t.parquet").stat().st_size > 0
    entry = json.loads((tmp_path / "metadata" / "trace_registry.jsonl").read_text().splitlines()[-1])
    assert entry["name"] == "t" and entry["n"] == 24 and entry["af_accuracy"] == side["stats"]["af_accuracy"]
    assert not list(traces.glob(".*"))  # no temporary or work files left behind


@pytest.mark.slow
def test_ads_traces_do_not_depend_on_batch_size_or_engine(tiny_assets, tmp_path, grad_file):
    ads = dict(tau=1.0, lam=0.5, eps=1e-2, grad_path=grad_file[0])
    gentraces.main(base_args(tiny_assets, tmp_path / "a", batch_size=3, **ads))
    gentraces.main(base_args(tiny_assets, tmp_path / "b", batch_size=24, engine="reference", **ads))
    a, b = load_rows(tmp_path / "a"), load_rows(tmp_path / "b")
    assert [(r["completion"], r["forced"]) for r in a] == [(r["completion"], r["forced"]) for r in b]
    side = yaml.safe_load((tmp_path / "a" / "traces" / "t.yaml").read_text())
    assert side["diagnostics"]["frac_weights_changed_plus"] > 0.5
    assert side["diagnostics"]["grad_rms"] > 0


@pytest.mark.slow
def test_two_processes_give_the_same_traces_as_one(tiny_assets, tmp_path, grad_file):
    ads = dict(tau=1.0, lam=0.5, eps=1e-2, grad_path=grad_file[0], batch_size=4)
    gentraces.main(base_args(tiny_assets, tmp_path / "one", **ads))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "gentraces.py"), *base_args(tiny_assets, tmp_path / "two", **ads)]
    subprocess.run(cmd, check=True, env=ENV, cwd=REPO, capture_output=True)
    one, two = load_rows(tmp_path / "one"), load_rows(tmp_path / "two")
    assert [(r["idx"], r["completion"], r["forced"]) for r in one] == \
           [(r["idx"], r["completion"], r["forced"]) for r in two]
    side = yaml.safe_load((tmp_path / "two" / "traces" / "t.yaml").read_text())
    assert side["diagnostics"]["processes"] == 2


@pytest.mark.slow
def test_fd_check_is_recorded_and_warns_when_finite_differences_disagree_with_the_jvp(
        tiny_assets, tmp_path, grad_file, holdout, capfd):
    # a large g makes eps = 1e-2 a step far outside the linear regime: FD is then mostly truncation
    # error, which the check must measure and announce; eps=auto must find a step where FD is exact
    big = save_gradient({n: v * 300 for n, v in grad_file[1].items()}, tmp_path / "big.safetensors", holdout)
    ads = dict(tau=1.0, lam=0.5, grad_path=big, max_samples=4, fd_check=48)
    capfd.readouterr()
    gentraces.main(base_args(tiny_assets, tmp_path, eps=1e-2, trace_name="fixed", **ads))
    assert "warning: finite differences disagree with the exact JVP" in capfd.readouterr().err
    fixed = yaml.safe_load((tmp_path / "traces" / "fixed.yaml").read_text())["diagnostics"]
    assert fixed["fd_cosine_median"] < 0.9 and fixed["fd_positions"] >= 48 and fixed["eps"] == 1e-2
    gentraces.main(base_args(tiny_assets, tmp_path, eps="auto", trace_name="auto", **ads))
    assert "warning" not in capfd.readouterr().err
    auto = yaml.safe_load((tmp_path / "traces" / "auto.yaml").read_text())["diagnostics"]
    assert auto["eps_auto"] and auto["eps"] < 1e-2 and auto["fd_cosine_median"] > 0.99
    assert len(auto["eps_candidates"]) == len(sampling.EPS_GRID)
    registry = [json.loads(line) for line in (tmp_path / "metadata" / "trace_registry.jsonl").read_text().splitlines()]
    assert [(e["name"], e["eps"]) for e in registry] == [("fixed", 1e-2), ("auto", auto["eps"])]
    assert registry[0]["fd_cosine_median"] == fixed["fd_cosine_median"]


@pytest.mark.slow
def test_lam_zero_never_loads_the_proxy(tiny_assets, tmp_path):
    gentraces.main(base_args(tiny_assets, tmp_path, tau=1.0, lam=0, proxy="/nonexistent/proxy", max_samples=4))
    assert len(load_rows(tmp_path)) == 4


def _corrupt(kind, tmp_path, grad_file, tiny_assets):
    path, g = grad_file
    bad = tmp_path / "bad.safetensors"
    if kind == "missing":
        return tmp_path / "nope.safetensors"
    if kind == "truncated":
        bad.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        bad.write_text("this is not a safetensors file at all")
    elif kind == "nan":
        g = dict(g)
        first = next(iter(g))
        g[first] = g[first].clone()
        g[first][0] = float("nan")
        save_file(g, str(bad))
    elif kind == "mismatch":
        g = dict(g)
        g.pop("lm_head.weight", None)
        g["extra.weight"] = torch.zeros(3)
        save_file(g, str(bad))
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("kind,message", [
    ("missing", "grad_path must be an existing file"),
    ("truncated", "not a readable safetensors file"),
    ("text", "not a readable safetensors file"),
    ("nan", "NaN or Inf"),
    ("mismatch", "does not match the proxy"),
])
def test_bad_gradient_file_is_one_clear_error_and_writes_nothing(kind, message, tiny_assets, tmp_path, grad_file):
    grad = _corrupt(kind, tmp_path, grad_file, tiny_assets)
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit) as e:
        gentraces.main(base_args(tiny_assets, exp, tau=1.0, lam=0.1, grad_path=grad))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not exp.exists()


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ({"tau": -1}, "tau must be >= 0"),
    ({"tau": 1.0, "lam": 0.1, "eps": 0, "grad_path": REPO / "gen_config.yaml"}, "eps must be > 0"),
    ({"top_p": 0}, "top_p must be > 0, got 0"),
    ({"top_p": 1.5}, "top_p must be <= 1, got 1.5"),
    ({"max_prompt_length": 160}, "max_prompt_length (160) must be < max_length (160)"),
    ({"tau": 1.0, "lam": 0.1}, "lam != 0 needs grad_path"),
    ({"data_split": "gsm8k_dev"}, "data_split must be 'gsm8k_train', "),
    ({"temperature": 1}, "did you mean 'tau'"),
    ({"max_lenght": 1}, "did you mean 'max_length'"),
    ({"max_prompt_length": 5}, "no prompts left"),
    ({"tau": 1.0, "ads_control": "permute"}, "it needs lam != 0"),
    ({"ads_control": "shuffle"}, "ads_control must be 'none' or 'permute', got 'shuffle'"),
    ({"engine": "vllm"}, "engine must be 'auto', 'eager' or 'reference', got 'vllm'"),
    ({"drain_steps": -1}, "drain_steps must be"),
    ({"teacher": "/nonexistent/teacher"}, "teacher must be a model directory or a Hub id"),
])
def test_bad_config_is_one_clear_error_and_writes_nothing(override, message, tiny_assets, tmp_path):
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit) as e:
        gentraces.main(base_args(tiny_assets, exp, **override))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not exp.exists()


@pytest.mark.slow
def test_teacher_and_proxy_with_different_tokenizers_is_refused(tiny_assets, tmp_path, grad_file):
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit) as e:
        gentraces.main(base_args(tiny_assets, exp, tau=1.0, lam=0.1, grad_path=grad_file[0],
                                 proxy=tiny_assets / "student"))
    assert "different tokenizers" in str(e.value)
    assert not exp.exists()


@pytest.mark.slow
def test_cli_error_is_a_single_line_without_traceback(tiny_assets, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "gentraces.py"), *base_args(tiny_assets, tmp_path, tau=-1)],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: tau must be >= 0, got -1"


@pytest.mark.slow
@pytest.mark.parametrize("sig,after_chunks", [(signal.SIGKILL, 1), (signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_killed_run_resumes_to_the_same_output(sig, after_chunks, tiny_assets, tmp_path, grad_file):
    """Kill generation once some chunks are decoded (the point varies with the case), rerun the same
    command, and compare with an uninterrupted run."""
    args = base_args(tiny_assets, tmp_path / "killed", tau=1.0, lam=0.5, eps=1e-2, grad_path=grad_file[0],
                     batch_size=1, max_samples=12)
    work = tmp_path / "killed" / "traces" / ".t.work"
    # a runner started in the background (`nohup ... &`) hands its children SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: give the child the default disposition back
    proc = subprocess.Popen([sys.executable, str(REPO / "gentraces.py"), *args], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    saved = lambda: len(list(work.glob("decoded*.jsonl")) + list(work.glob("chunk*.jsonl")))  # noqa: E731
    while saved() < after_chunks:
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "traces" / "t").exists()
    assert 1 <= saved() < 3
    gentraces.main(args)
    gentraces.main(base_args(tiny_assets, tmp_path / "whole", tau=1.0, lam=0.5, eps=1e-2,
                             grad_path=grad_file[0], batch_size=12, max_samples=12))
    killed, whole = load_rows(tmp_path / "killed"), load_rows(tmp_path / "whole")
    assert [(r["completion"], r["forced"]) for r in killed] == [(r["completion"], r["forced"]) for r in whole]
    assert not work.exists()


@pytest.mark.slow
def test_stale_chunks_from_another_config_are_not_reused(tiny_assets, tmp_path):
    work = tmp_path / "traces" / ".t.work"
    work.mkdir(parents=True)
    (work / "fingerprint").write_text("from-another-config")
    (work / "chunk00000.jsonl").write_text('{"idx": 0, "completion": "stale"}\n')
    gentraces.main(base_args(tiny_assets, tmp_path, tau=0, max_samples=4))
    assert all(r["completion"] != "stale" for r in load_rows(tmp_path))


def test_a_process_that_starts_after_the_traces_were_published_exits_instead_of_waiting(tmp_path):
    """With more processes than chunks, the main process can write every chunk, publish the traces
    and remove the work folder before a slow process even looks for it; that process has nothing to
    do and must return, not wait for a fingerprint that is gone (seen on 2 GPUs: a hung eval stage)."""
    import threading
    import types
    import utils
    cfg = utils.load_config("gen_config.yaml", [f"exp_dir={tmp_path}", "trace_name=t"])
    late = types.SimpleNamespace(is_main_process=False)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(work=gentraces.prepare_workdir(cfg, late)), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # nothing published yet and no fingerprint: a started run is awaited
    (tmp_path / "traces" / "t").mkdir(parents=True)
    waiter.join(timeout=5)
    assert not waiter.is_alive() and result["work"] is None
    main = types.SimpleNamespace(is_main_process=True)
    work = gentraces.prepare_workdir(cfg, main)
    assert gentraces.prepare_workdir(cfg, late) == work  # a process on time still gets the folder


def test_a_greedy_run_on_untrained_models_writes_rows_sidecar_and_registry(untrained_assets, tmp_path):
    gentraces.main(base_args(untrained_assets, tmp_path, tau=0, max_samples=8, batch_size=3, system_prompt=tf.SYSTEM))
    rows = load_rows(tmp_path)
    assert [r["idx"] for r in rows] == list(range(8))
    assert all(r["prompt"].endswith(tf.TEACHER_MARKER) and r["completion"].startswith("<think>\n") for r in rows)
    assert all(r["trace"] == r["prompt"] + r["completion"] for r in rows)
    side = yaml.safe_load((tmp_path / "traces" / "t.yaml").read_text())
    entry = json.loads((tmp_path / "metadata" / "trace_registry.jsonl").read_text().splitlines()[-1])
    assert side["stats"]["n"] == entry["n"] == 8 and entry["af_accuracy"] == side["stats"]["af_accuracy"]
    assert (tmp_path / "traces" / "t.parquet").stat().st_size > 0
    assert not list((tmp_path / "traces").glob(".*"))  # no temporary or work files left behind


def test_ads_traces_on_untrained_models_do_not_depend_on_batch_size_or_engine(untrained_assets, tmp_path):
    proxy = AutoModelForCausalLM.from_pretrained(untrained_assets / "proxy")
    torch.manual_seed(0)
    grad = tmp_path / "g.safetensors"
    save_file({n: torch.randn_like(p) * 1e-2 for n, p in proxy.named_parameters()}, str(grad))
    # fd_check=0: the FD check reads the gradient's holdout traces, which only the slow tests make
    ads = dict(tau=1.0, lam=0.5, eps=1e-2, grad_path=grad, fd_check=0, max_samples=6, system_prompt=tf.SYSTEM)
    gentraces.main(base_args(untrained_assets, tmp_path / "a", batch_size=4, **ads))
    gentraces.main(base_args(untrained_assets, tmp_path / "b", batch_size=6, engine="reference", **ads))
    a, b = load_rows(tmp_path / "a"), load_rows(tmp_path / "b")
    assert [(r["completion"], r["forced"]) for r in a] == [(r["completion"], r["forced"]) for r in b]
    assert yaml.safe_load((tmp_path / "a" / "traces" / "t.yaml").read_text())["diagnostics"]["grad_rms"] > 0


def test_drain_steps_reach_the_engine_and_leave_float32_traces_unchanged(untrained_assets, tmp_path, monkeypatch):
    import engine
    real, seen = engine.generate, []

    def recording(*args, **kwargs):
        seen.append(args[7].drain_steps)  # options, as decode.generate passes them
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", recording)
    sampled = dict(tau=1.0, max_samples=5, batch_size=4, system_prompt=tf.SYSTEM)
    for name, halvings in (("a", 4), ("b", 0)):
        gentraces.main(base_args(untrained_assets, tmp_path / name, drain_steps=halvings, **sampled))
        assert set(seen) == {halvings}  # the traces' decode and the answer forcing
        seen.clear()
    a, b = load_rows(tmp_path / "a"), load_rows(tmp_path / "b")
    assert [(r["completion"], r["forced"]) for r in a] == [(r["completion"], r["forced"]) for r in b]
    assert yaml.safe_load((tmp_path / "b" / "traces" / "t.yaml").read_text())["diagnostics"]["drain_steps"] == 0


def test_token_details_are_stored_for_the_first_prompts_and_stage_numbers_reach_tensorboard(untrained_assets,
                                                                                             tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    gentraces.main(base_args(untrained_assets, tmp_path, tau=0, max_samples=5, batch_size=3, token_details=2,
                             report_to="tensorboard", system_prompt=tf.SYSTEM))
    rows = load_rows(tmp_path)
    assert [bool(r["tokens"]) for r in rows] == [True, True, False, False, False]
    for r in rows[:2]:
        details = json.loads(r["tokens"])
        assert details["tau"] == 0 and details["lam"] == 0 and details["control"] == "none"
        tokens = details["tokens"]
        assert "<think>\n" + "".join(t["t"] for t in tokens) == r["completion"] and len(tokens) == r["n_tokens"]
        for t in tokens:  # greedy: the chosen token is the teacher's best, and no ADS term moved it
            assert t["ads"] == 0 and t["lp"] <= 0 and len(t["alt"]) == gentraces.VIEWER_ALTERNATIVES
            assert all(t["lp"] >= lp and ads == 0 for _, lp, ads in t["alt"])
    events = EventAccumulator(str(next((tmp_path / "runs" / "t").glob("events.out.tfevents.*")))).Reload()
    stats = yaml.safe_load((tmp_path / "traces" / "t.yaml").read_text())["stats"]
    assert events.Scalars("gentraces/af_accuracy")[0].value == pytest.approx(stats["af_accuracy"])
    assert events.Scalars("gentraces/tokens_per_s")[0].value > 0


def test_a_chunk_decoded_before_a_stop_is_not_decoded_again(untrained_assets, tmp_path):
    """Batch 1 makes chunks of 4 rows; the second run finds chunk 0 decoded (as a killed run leaves it,
    here with no tokens) and chunk 1's file cut short, and decodes chunk 1 only."""
    run = dict(tau=0, max_samples=8, batch_size=1, system_prompt=tf.SYSTEM)
    gentraces.main(base_args(untrained_assets, tmp_path / "whole", **run))
    args = base_args(untrained_assets, tmp_path / "resumed", **run)
    work = tmp_path / "resumed" / "traces" / ".t.work"
    work.mkdir(parents=True)
    (work / "fingerprint").write_text(gentraces.run_fingerprint(gentraces.settings(args)))
    (work / "decoded00000.jsonl").write_text("".join(json.dumps({"idx": i, "gen_ids": [], "finished": False}) + "\n"
                                                     for i in range(4)))
    (work / "decoded00001.jsonl").write_text(json.dumps({"idx": 4, "gen_ids": [], "finished": False}) + "\n")  # cut
    gentraces.main(args)
    whole, resumed = load_rows(tmp_path / "whole"), load_rows(tmp_path / "resumed")
    assert [r["n_tokens"] for r in resumed[:4]] == [0] * 4 and all(r["n_tokens"] > 0 for r in whole[:4])
    assert [r["completion"] for r in resumed[4:]] == [r["completion"] for r in whole[4:]]
    assert not work.exists()


def test_work_of_a_run_with_another_chunk_size_is_not_reused(untrained_assets, tmp_path):
    """Chunk c of another batch size holds other rows: reused, it would duplicate some and drop others."""
    run = dict(tau=0, max_samples=8, system_prompt=tf.SYSTEM)
    other = gentraces.settings(base_args(untrained_assets, tmp_path, batch_size=1, **run))
    work = tmp_path / "traces" / ".t.work"
    work.mkdir(parents=True)
    (work / "fingerprint").write_text(gentraces.run_fingerprint(other))
    (work / "chunk00000.jsonl").write_text('{"idx": 0, "completion": "stale"}\n')
    gentraces.main(base_args(untrained_assets, tmp_path, batch_size=2, **run))
    rows = load_rows(tmp_path)
    assert [r["idx"] for r in rows] == list(range(8)) and all(r["completion"] != "stale" for r in rows)


def test_a_run_stopped_while_building_rows_resumes_without_decoding_again(untrained_assets, tmp_path, monkeypatch):
    """Stopped after chunk 0's rows were written and while chunk 1's were built (all decoded): the
    rerun builds chunk 1 from its decoded file and decodes nothing."""
    run = dict(tau=0, max_samples=8, batch_size=1, system_prompt=tf.SYSTEM)
    gentraces.main(base_args(untrained_assets, tmp_path / "whole", **run))
    args = base_args(untrained_assets, tmp_path / "stopped", **run)
    build, built = gentraces.build_chunk, []

    def stop_at_second(*a, **k):
        if built:
            raise KeyboardInterrupt
        built.append(1)
        return build(*a, **k)
    monkeypatch.setattr(gentraces, "build_chunk", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        gentraces.main(args)
    work = tmp_path / "stopped" / "traces" / ".t.work"
    assert sorted(p.name for p in work.glob("*.jsonl")) == ["chunk00000.jsonl", "decoded00001.jsonl"]
    monkeypatch.setattr(gentraces, "build_chunk", build)
    monkeypatch.setattr(gentraces, "decode_chunks", lambda *a, **k: pytest.fail("decoded again"))
    gentraces.main(args)
    whole, resumed = load_rows(tmp_path / "whole"), load_rows(tmp_path / "stopped")
    assert [(r["completion"], r["forced"]) for r in resumed] == [(r["completion"], r["forced"]) for r in whole]
