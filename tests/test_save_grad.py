import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import save_grad
import trace_fixtures as tf
from utils import ConfigError, load_tokenizer, tokenize_example

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128  # truncates the longest completions; the long-question row keeps no completion token
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    tok = tf.make_tokenizer(tf.TEACHER)
    proxy = tf.save_proxy(root / "proxy", tok)
    traces = tf.save_traces(root / "holdout", tf.trace_rows(tok, 9, long_question_rows=(4,)))
    return root, proxy, traces


def run_inprocess(proxy, traces, out, batch_size):
    save_grad.main([f"proxy={proxy}", f"traces={traces}", f"out={out}", f"batch_size={batch_size}",
                    f"max_length={MAX_LENGTH}"])
    return load_file(str(out))


def run_cli(*args, processes=1):
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "save_grad.py")]
    else:
        # `--cpu` would start a single process (accelerate runs several CPU processes only through
        # mpirun); `--multi_gpu` starts them with torchrun and save_grad.py picks gloo without CUDA.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "save_grad.py")]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=ROOT, env=OFFLINE, timeout=120)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def reference_gradient(proxy_path, traces_path):
    """The definition, written plainly: one sequence at a time, mean NLL over completion tokens."""
    import datasets
    tok = load_tokenizer(str(proxy_path))
    model = AutoModelForCausalLM.from_pretrained(str(proxy_path), dtype=torch.float32).eval()
    losses = []
    for row in datasets.load_from_disk(str(traces_path)):
        ids, labels = tokenize_example(tok, row["system"], row["question"], row["completion"], MAX_LENGTH)
        labels = torch.tensor(labels[1:])
        if (labels != -100).sum() == 0:
            continue
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        losses.append(F.cross_entropy(logits, labels, ignore_index=-100))
    torch.stack(losses).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}, len(losses)


@pytest.fixture(scope="module")
def g_batch4(assets):
    root, proxy, traces = assets
    return run_inprocess(proxy, traces, root / "g4.safetensors", batch_size=4)


def test_gradient_is_independent_of_batch_size(assets, g_batch4):
    root, proxy, traces = assets
    assert_same(run_inprocess(proxy, traces, root / "g1.safetensors", batch_size=1), g_batch4)


@pytest.mark.slow
def test_gradient_is_independent_of_process_count(assets, g_batch4):
    root, proxy, traces = assets
    out = root / "g_2proc.safetensors"
    res = run_cli(f"proxy={proxy}", f"traces={traces}", f"out={out}", "batch_size=3",
                  f"max_length={MAX_LENGTH}", processes=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(load_file(str(out)), g_batch4)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["n_processes"] == "2"


def test_gradient_matches_the_definition(assets, g_batch4):
    root, proxy, traces = assets
    expected, n_kept = reference_gradient(proxy, traces)
    assert n_kept == 8  # the long-question row is dropped
    assert_same(g_batch4, expected)
    assert sum(g.abs().sum() for g in g_batch4.values()) > 0


def test_saved_keys_are_parameter_names_with_metadata(assets, g_batch4):
    root, proxy, traces = assets
    model = AutoModelForCausalLM.from_pretrained(str(proxy))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(g_batch4) == sorted(names)
    assert not any(n.startswith("module.") for n in g_batch4)
    assert all(g.dtype == torch.float32 and g.is_contiguous() for g in g_batch4.values())
    with safe_open(str(root / "g4.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["n_sequences"] == "8" and meta["n_dropped"] == "1"
    assert int(meta["n_tokens"]) > 0 and float(meta["loss"]) > 0 and float(meta["grad_norm"]) > 0
    assert meta["proxy"] == str(proxy) and meta["traces"] == str(traces)
    assert not [p for p in root.iterdir() if ".tmp" in p.name]


def test_missing_traces_is_a_one_line_error_and_writes_nothing(assets, tmp_path):
    root, proxy, _ = assets
    out = tmp_path / "g.safetensors"
    res = run_cli(f"proxy={proxy}", f"traces={tmp_path / 'nope'}", f"out={out}")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nope" in res.stderr and "no such directory" in res.stderr
    assert not out.exists()


def test_traces_without_required_columns_or_rows_are_rejected(assets, tmp_path):
    import datasets
    root, proxy, _ = assets
    datasets.Dataset.from_list([{"idx": 0, "question": "q"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="lacks the columns system, completion"):
        save_grad.load_traces(tmp_path / "bad")
    empty = datasets.Dataset.from_list(tf.trace_rows(tf.make_tokenizer(tf.TEACHER), 1)).select([])
    empty.save_to_disk(str(tmp_path / "empty"), num_shards=1)
    with pytest.raises(ConfigError, match="is empty"):
        save_grad.load_traces(tmp_path / "empty")


# Bad input: one line `error: ...` on stderr, exit status 2, no traceback, nothing written. The proxy
# given is a directory holding only the tokenizer, so a check that came after the model load would
# end in a traceback instead and fail the test.

@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad_bad")
    teacher_tok = tf.make_tokenizer(tf.TEACHER)
    teacher_tok.save_pretrained(root / "proxy")
    tf.make_tokenizer(tf.STUDENT).save_pretrained(root / "other_tokenizer")
    tf.save_traces(root / "holdout", tf.trace_rows(teacher_tok, 4))
    return root


def traces_from(teacher_dir):
    """Traces whose yaml sidecar (as gentraces.py writes it) names the model that generated them."""
    def make(root, tmp_path):
        traces = tf.save_traces(tmp_path / "holdout", tf.trace_rows(tf.make_tokenizer(tf.TEACHER), 4))
        (tmp_path / "holdout.yaml").write_text(yaml.safe_dump({"config": {"teacher": str(root / teacher_dir),
                                                                            "tokenizer": None}}))
        return {"traces": traces}
    return make


def under_a_file(root, tmp_path):
    (tmp_path / "a_file").write_text("")
    return {"out": tmp_path / "a_file" / "sub" / "g.safetensors"}


@pytest.mark.slow  # a process per case (~3 s each to start torch); test_config_errors.py checks these in-process
@pytest.mark.parametrize("bad,message", [
    ({"batch_sise": 4}, "unknown config key 'batch_sise' (did you mean 'batch_size'?)"),
    (lambda root, tmp_path: {"proxy": tmp_path / "no_such_proxy"}, "no_such_proxy'"),
    (traces_from("other_tokenizer"), "have different tokenizers"),
    (under_a_file, "a_file is a file"),
    (lambda root, tmp_path: {"out": tmp_path}, "is a directory"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"batch_size": -2}, "batch_size must be >= 1, got -2"),
    ({"max_length": 0}, "max_length must be >= 1, got 0"),
    ({"max_length": 8}, "keeps a completion token within max_length=8"),
], ids=["unknown_key", "missing_proxy", "other_tokenizer", "out_under_a_file", "out_is_a_dir", "batch_size_0",
        "batch_size_negative", "max_length_0", "max_length_below_every_prompt"])
def test_bad_input_is_one_error_line_and_writes_nothing(bad, message, tokenizer_only, tmp_path):
    args = {"proxy": tokenizer_only / "proxy", "traces": tokenizer_only / "holdout",
            "out": tmp_path / "new_dir" / "g.safetensors", "max_length": MAX_LENGTH}
    args.update(bad(tokenizer_only, tmp_path) if callable(bad) else bad)
    before = sorted(tmp_path.rglob("*"))
    res = run_cli(*(f"{k}={v}" for k, v in args.items()))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr[-3000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no output file, temporary file or directory


def test_traces_from_the_proxys_own_tokenizer_pass_the_check(tokenizer_only, tmp_path):
    """The tokenizer check must not refuse the normal case (so a failure above is the mismatch)."""
    args = traces_from("proxy")(tokenizer_only, tmp_path)
    tok = load_tokenizer(str(tokenizer_only / "proxy"))
    save_grad.check_traces_tokenizer(SimpleNamespace(traces=args["traces"], proxy="p", trust_remote_code=False), tok)
    with pytest.raises(ConfigError, match="have different tokenizers"):
        save_grad.check_traces_tokenizer(SimpleNamespace(traces=args["traces"], proxy="p", trust_remote_code=False),
                                         tf.make_tokenizer(tf.STUDENT))


def test_traces_written_with_another_tokenizer_are_refused_by_their_sidecar(assets, tmp_path):
    """The sidecar beside the traces names the model whose tokenizer wrote them; a proxy with other
    token ids is refused before any gradient, and a sidecar naming nothing loadable is not a refusal."""
    import shutil

    import yaml
    _, proxy, traces = assets
    other = tmp_path / "other_teacher"
    tf.make_tokenizer(tf.STUDENT).save_pretrained(other)
    copied = tmp_path / "holdout"
    shutil.copytree(traces, copied)
    (tmp_path / "holdout.yaml").write_text(yaml.safe_dump({"config": {"teacher": str(other)}}))
    with pytest.raises(ConfigError, match="have different tokenizers"):
        run_inprocess(proxy, copied, tmp_path / "g.safetensors", 4)
    assert not (tmp_path / "g.safetensors").exists()
    (tmp_path / "holdout.yaml").write_text(yaml.safe_dump({"config": {"teacher": str(tmp_path / "missing")}}))
    assert run_inprocess(proxy, copied, tmp_path / "g.safetensors", 4)  # checked where it can be
