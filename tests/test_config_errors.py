"""Every bad setting of every script is one 'error: ...' line, exit status 2, no traceback, nothing
written and no model loaded. Each script's table runs in this process through utils.run_cli, with
model loading replaced by a hook that fails the test; a few rows of each run again as a real
subprocess, and pipeline.sh is checked with the accelerate launcher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import distill
import gentraces
import grid
import report
import save_grad
import trace_fixtures as tf
import utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("WORLD_SIZE", None)
ADS = "tau9.00e-01_lam5.00e-02_eps1.00e-02"
TEMPERATURE = "tau1.50e+00_lam0.00e+00_eps0.00e+00"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs for every script. The teacher and proxy are tokenizers only, so a model load
    would fail anyway; the student is a real tiny model (the LoRA target check reads its config)."""
    root = tmp_path_factory.mktemp("inputs")
    teacher_tok = tf.make_tokenizer(tf.TEACHER)
    teacher_tok.save_pretrained(root / "teacher")
    tf.save_student(root / "student", tf.make_tokenizer(tf.STUDENT))
    rows = tf.trace_rows(teacher_tok, 4)
    tf.save_traces(root / "traces", rows)
    tf.save_traces(root / "no_completion", [{k: v for k, v in r.items() if k != "completion"} for r in rows])
    datasets.Dataset.from_list(rows).select([]).save_to_disk(str(root / "empty_traces"), num_shards=1)
    (root / "grad.safetensors").write_bytes(b"")  # exists; what is in it is checked after the settings
    (root / "a_file").write_text("")
    (root / "not_a_dataset").mkdir()
    questions = [{"question": tf.question(a, 2, "apples"), "answer": f"#### {a + 2}"} for a in range(10)]
    tf.write_jsonl(root / "data/gsm8k/test.jsonl", questions)
    tf.write_jsonl(root / "data/gsm8k/train.jsonl", questions)
    tf.write_jsonl(root / "data_no_answer/gsm8k/test.jsonl", [{"question": "q"}])
    tf.write_jsonl(root / "data_empty/gsm8k/test.jsonl", [])
    tf.write_jsonl(root / "data_not_json/gsm8k/test.jsonl", ["{'question': 'q'"])
    return root


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every script loads its models through AutoModelForCausalLM.from_pretrained."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad setting was reported")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def run_in_process(module, argv, monkeypatch, capsys):
    """(exit status, stderr) of the script run as its __main__ block runs it."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        utils.run_cli(module.main)
    return e.value.code, capsys.readouterr().err


def snapshot(path):
    return sorted(str(p) for p in Path(path).rglob("*"))


def assert_one_error_line(status, err, message):
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err and "Traceback" not in err, err


def args_of(base, bad, inputs, tmp_path):
    """key=value arguments: the valid `base` with the table row's changes (a callable gets the paths)."""
    args = {**base, **(bad(inputs, tmp_path) if callable(bad) else bad)}
    return [f"{k}={'null' if v is None else v}" for k, v in args.items()]


@pytest.mark.parametrize("yaml_name,schema", [("gen_config.yaml", gentraces.GenSettings),
                                              ("grad_config.yaml", save_grad.GradSettings),
                                              ("train_config.yaml", distill.TrainSettings)])
def test_each_yaml_and_its_schema_declare_the_same_keys(yaml_name, schema):
    import yaml
    assert list(yaml.safe_load((ROOT / yaml_name).read_text())) == list(schema.model_fields)


# gentraces.py

def gen_base(inputs, tmp_path):
    return {"teacher": inputs / "teacher", "data_dir": inputs / "data", "data_split": "gsm8k_test",
            "exp_dir": tmp_path / "exp", "trace_name": "t", "max_length": 160, "max_prompt_length": 96}


ADS_ROW = {"tau": 1.0, "lam": 0.1}
GEN_CASES = [
    ("lam_not_a_number", {"lam": "abc"}, "lam must be a number, got 'abc'"),
    ("top_p_not_a_number", {"top_p": "abc"}, "top_p must be a number, got 'abc'"),
    ("batch_size_fractional", {"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
    ("batch_size_boolean", {"batch_size": "true"}, "batch_size must be an integer, got true"),
    ("tau_nan", {"tau": ".nan"}, "tau must be a finite number, got nan"),
    ("eps_inf", lambda i, t: {**ADS_ROW, "eps": ".inf", "grad_path": i / "grad.safetensors"},
     "eps must be a finite number or 'auto', got inf"),
    ("eps_zero_with_ads", lambda i, t: {**ADS_ROW, "eps": 0, "grad_path": i / "grad.safetensors"},
     "eps must be > 0 (or auto) with lam != 0"),
    ("lam_inf", {"lam": "-.inf"}, "lam must be a finite number, got -inf"),
    ("max_samples_negative", {"max_samples": -1}, "max_samples must be >= 1, got -1"),
    ("answer_force_tokens_negative", {"answer_force_tokens": -1}, "answer_force_tokens must be >= 1, got -1"),
    ("top_p_above_one", {"top_p": 1.5}, "top_p must be <= 1, got 1.5"),
    ("top_k_negative", {"top_k": -1}, "top_k must be >= 0, got -1"),
    ("seed_negative", {"seed": -3}, "seed must be >= 0, got -3"),
    ("repetition_penalty_zero", {"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
    ("prompt_not_shorter", {"max_prompt_length": 160}, "max_prompt_length (160) must be < max_length (160)"),
    ("trace_name_escapes", {"trace_name": "../x"}, "trace_name must be a plain name that stays inside its folder"),
    ("trace_name_hidden", {"trace_name": ".t.work"}, "trace_name must be a plain name"),
    ("trace_name_missing", {"trace_name": None}, "trace_name is required"),
    ("trace_colname_overwrites", {"trace_colname": "idx"}, "trace_colname=idx would overwrite a column"),
    ("unknown_key", {"lamda": 0.1}, "unknown config key 'lamda' (did you mean 'lam'?)"),
    ("data_split_unknown", {"data_split": "gsm8k_dev"}, "data_split must be 'gsm8k_train', "),
    ("answer_force_not_bool", {"answer_force": "maybe"}, "answer_force must be true or false, got 'maybe'"),
    ("engine_unknown", {"engine": "vllm"}, "engine must be 'auto', 'eager' or 'reference', got 'vllm'"),
    ("dtype_unknown", {"proxy_dtype": "fp8"}, "proxy_dtype must be 'bfloat16', 'float16' or 'float32', got 'fp8'"),
    ("attention_unknown", {"attn_implementation": "sdpaa"}, "attn_implementation must be one of"),
    ("greedy_with_ads", lambda i, t: {"lam": 0.1, "grad_path": i / "grad.safetensors"}, "tau=0 is greedy decoding on the teacher; lam must be 0 with it"),
    ("ads_without_gradient", ADS_ROW, "lam != 0 needs grad_path"),
    ("gradient_missing", lambda i, t: {**ADS_ROW, "grad_path": t / "nope.safetensors"},
     "grad_path must be an existing file"),
    ("proxy_missing", lambda i, t: {**ADS_ROW, "grad_path": i / "grad.safetensors", "proxy": t / "no_proxy"},
     "proxy must be a model directory or a Hub id"),
    ("control_without_ads", {"tau": 1.0, "ads_control": "permute"}, "it needs lam != 0"),
    ("grid_row_malformed", {"grid_row": "0.9 0.1"}, "grid_row: expected 'tau lam eps [permute]'"),
    ("grid_row_not_what_is_sampled", {"tau": 1.5, "role": "teacher_eval", "grid_row": "1.2 0 0"},
     "grid_row='1.2 0 0' is not what this run samples"),
    ("train_traces_without_a_row", {"tau": 1.5, "role": "train"}, "role=train needs grid_row"),
    ("role_unknown", {"role": "eval"}, "role must be 'holdout', 'train', 'teacher_eval', 'student_eval' or 'other', got 'eval'"),
    ("teacher_missing", lambda i, t: {"teacher": t / "no_teacher"}, "teacher must be a model directory or a Hub id"),
    ("teacher_is_a_file", lambda i, t: {"teacher": i / "a_file"}, "(it is a file)"),
    ("exp_dir_under_a_file", lambda i, t: {"exp_dir": i / "a_file" / "exp"}, "a_file is a file"),
    ("exp_dir_is_a_file", lambda i, t: {"exp_dir": i / "a_file"}, "exp_dir must be a directory that can be written"),
    ("data_dir_missing", lambda i, t: {"data_dir": t / "no_data"}, "data_dir must be an existing directory"),
    ("data_split_file_missing", {"data_split": "mmlu_test"}, "mmlu/test.jsonl, which does not exist"),
    ("fd_check_traces_missing", lambda i, t: {"fd_check_traces": t / "none"}, "fd_check_traces must be a trace dataset"),
    ("fd_check_negative", {"fd_check": -1}, "fd_check must be >= 0, got -1"),
    ("data_lacks_a_field", lambda i, t: {"data_dir": i / "data_no_answer"}, "test.jsonl:1: lacks the field answer"),
    ("data_empty", lambda i, t: {"data_dir": i / "data_empty"}, "gsm8k_test: the source data has no rows"),
    ("data_not_json", lambda i, t: {"data_dir": i / "data_not_json"}, "test.jsonl:1: not a JSON line"),
    ("every_prompt_too_long", {"max_prompt_length": 5}, "no prompts left"),
]


@pytest.mark.parametrize("bad,message", [c[1:] for c in GEN_CASES], ids=[c[0] for c in GEN_CASES])
def test_gentraces_bad_setting_is_one_error_line_before_any_model_loads(bad, message, inputs, tmp_path, monkeypatch,
                                                                       capsys, no_model_loads):
    before = snapshot(inputs) + snapshot(tmp_path)
    status, err = run_in_process(gentraces, args_of(gen_base(inputs, tmp_path), bad, inputs, tmp_path),
                                 monkeypatch, capsys)
    assert_one_error_line(status, err, message)
    assert snapshot(inputs) + snapshot(tmp_path) == before


def test_every_problem_is_reported_on_its_own_line(inputs, tmp_path, monkeypatch, capsys, no_model_loads):
    argv = args_of(gen_base(inputs, tmp_path), {"lam": "abc", "tau": ".nan", "lamda": 1}, inputs, tmp_path)
    status, err = run_in_process(gentraces, argv, monkeypatch, capsys)
    assert status == 2 and err.splitlines() == [
        "error: unknown config key 'lamda' (did you mean 'lam'?); valid keys are listed in gen_config.yaml",
        "error: tau must be a finite number, got nan",
        "error: lam must be a number, got 'abc'"]


def test_negative_lam_runs_with_a_notice(inputs, tmp_path, monkeypatch, capsys, no_model_loads):
    """A pro-distillation tilt is allowed; its notice comes before any model loads (here the hook stops it)."""
    argv = args_of(gen_base(inputs, tmp_path), {"tau": 1.0, "lam": -0.1, "grad_path": inputs / "grad.safetensors",
                                                "proxy": inputs / "teacher"}, inputs, tmp_path)
    monkeypatch.setattr(sys, "argv", ["gentraces.py", *argv])
    with pytest.raises(BaseException):  # the proxy has no weights: the run stops after the notice
        utils.run_cli(gentraces.main)
    assert "notice: lam=-0.1 < 0 tilts sampling toward tokens that lower the proxy's loss" in capsys.readouterr().err


def test_text_keys_are_taken_as_typed(inputs, tmp_path):
    cfg = gentraces.settings(args_of(gen_base(inputs, tmp_path), {"system_prompt": "Note: answer [x]",
                                                                  "trace_name": "1e-3"}, inputs, tmp_path))
    assert cfg.system_prompt == "Note: answer [x]" and cfg.trace_name == "1e-3"


# save_grad.py

def grad_base(inputs, tmp_path):
    return {"proxy": inputs / "teacher", "traces": inputs / "traces", "out": tmp_path / "new" / "g.safetensors",
            "max_length": 256}


GRAD_CASES = [
    ("unknown_key", {"batch_sise": 4}, "unknown config key 'batch_sise' (did you mean 'batch_size'?)"),
    ("batch_size_zero", {"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ("batch_size_fractional", {"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
    ("batch_size_text", {"batch_size": "abc"}, "batch_size must be an integer, got 'abc'"),
    ("max_length_negative", {"max_length": -1}, "max_length must be >= 1, got -1"),
    ("max_length_inf", {"max_length": ".inf"}, "max_length must be an integer, got inf"),
    ("trust_remote_code_not_bool", {"trust_remote_code": "maybe"}, "trust_remote_code must be true or false"),
    ("attention_unknown", {"attn_implementation": "fast"}, "attn_implementation must be one of"),
    ("proxy_missing", lambda i, t: {"proxy": t / "no_proxy"}, "proxy must be a model directory or a Hub id"),
    ("proxy_required", {"proxy": None}, "proxy is required"),
    ("traces_missing", lambda i, t: {"traces": t / "nope"}, "traces must be a trace dataset written by gentraces.py"),
    ("traces_is_a_file", lambda i, t: {"traces": i / "a_file"}, "(it is a file)"),
    ("traces_not_a_dataset", lambda i, t: {"traces": i / "not_a_dataset"}, "(no state.json"),
    ("traces_lack_a_column", lambda i, t: {"traces": i / "no_completion"}, "lacks the columns completion"),
    ("traces_empty", lambda i, t: {"traces": i / "empty_traces"}, "is empty"),
    ("out_is_a_directory", lambda i, t: {"out": t}, "out must be the path of a file to write (it is a directory)"),
    ("out_under_a_file", lambda i, t: {"out": i / "a_file" / "g.safetensors"}, "a_file is a file"),
    ("out_required", {"out": None}, "out is required"),
    ("every_trace_too_long", {"max_length": 8}, "keeps a completion token within max_length=8"),
]


@pytest.mark.parametrize("bad,message", [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_save_grad_bad_setting_is_one_error_line_before_any_model_loads(bad, message, inputs, tmp_path, monkeypatch,
                                                                       capsys, no_model_loads):
    before = snapshot(inputs) + snapshot(tmp_path)
    status, err = run_in_process(save_grad, args_of(grad_base(inputs, tmp_path), bad, inputs, tmp_path),
                                 monkeypatch, capsys)
    assert_one_error_line(status, err, message)
    assert snapshot(inputs) + snapshot(tmp_path) == before


# distill.py

def train_base(inputs, tmp_path):
    return {"student": inputs / "student", "student_tokenizer": None, "train_traces": inputs / "traces",
            "eval_traces": inputs / "traces", "output_dir": tmp_path / "out", "max_length": 256,
            "global_batch_size": 4, "per_device_batch_size": 2}


TRAIN_CASES = [
    ("unknown_key", {"lora_rank": 8}, "unknown config key 'lora_rank' (did you mean 'lora_r'?)"),
    ("lora_r_negative", {"lora_r": -1}, "lora_r must be >= 0, got -1"),
    ("lora_r_fractional", {"lora_r": 2.5}, "lora_r must be an integer, got 2.5"),
    ("lora_dropout_one", {"lora_dropout": 1}, "lora_dropout must be < 1, got 1"),
    ("learning_rate_zero", {"learning_rate": 0}, "learning_rate must be > 0, got 0"),
    ("learning_rate_text", {"learning_rate": "abc"}, "learning_rate must be a number, got 'abc'"),
    ("warmup_ratio_text", {"warmup_ratio": "abc"}, "warmup_ratio must be a number, got 'abc'"),
    ("warmup_ratio_one", {"warmup_ratio": 1}, "warmup_ratio must be < 1, got 1"),
    ("epochs_nan", {"epochs": ".nan"}, "epochs must be a finite number, got nan"),
    ("max_steps_zero", {"max_steps": 0}, "max_steps must be >= 1, got 0"),
    ("max_samples_negative", {"max_samples": -1}, "max_samples must be >= 1, got -1"),
    ("eval_every_zero", {"eval_every": 0}, "eval_every must be > 0, got 0"),
    ("seed_text", {"seed": "abc"}, "seed must be an integer, got 'abc'"),
    ("scheduler_unknown", {"lr_scheduler": "cosin"}, "lr_scheduler must be a transformers scheduler name"),
    ("target_modules_empty", {"target_modules": "[]"}, "target_modules must not be empty"),
    ("target_modules_not_a_list", {"target_modules": "q_proj"}, "target_modules must be a list such as [a, b]"),
    ("target_modules_absent", {"target_modules": "[q_proj, qkv_proj]"},
     "target_modules qkv_proj not in the student"),
    ("global_batch_fractional", {"global_batch_size": 2.5}, "global_batch_size must be an integer, got 2.5"),
    ("batch_not_divisible", {"global_batch_size": 3}, "global_batch_size=3 is not a multiple"),
    ("dtype_unknown", {"dtype": "fp16"}, "dtype must be 'bfloat16', 'float16' or 'float32', got 'fp16'"),
    ("student_missing", lambda i, t: {"student": t / "none"}, "student must be a model directory or a Hub id"),
    ("train_traces_required", {"train_traces": None}, "train_traces is required"),
    ("train_traces_lack_a_column", lambda i, t: {"train_traces": i / "no_completion"}, "lacks the columns completion"),
    ("train_traces_empty", lambda i, t: {"train_traces": i / "empty_traces"}, "is empty"),
    ("eval_traces_not_a_dataset", lambda i, t: {"eval_traces": i / "not_a_dataset"}, "(no state.json"),
    ("output_dir_under_a_file", lambda i, t: {"output_dir": i / "a_file" / "out"}, "a_file is a file"),
    ("report_to_unknown", {"report_to": "mlflow"}, "report_to must be 'none', 'tensorboard' or 'wandb', got 'mlflow'"),
]


@pytest.mark.parametrize("bad,message", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_distill_bad_setting_is_one_error_line_before_any_model_loads(bad, message, inputs, tmp_path, monkeypatch,
                                                                     capsys, no_model_loads):
    before = snapshot(inputs) + snapshot(tmp_path)
    status, err = run_in_process(distill, args_of(train_base(inputs, tmp_path), bad, inputs, tmp_path),
                                 monkeypatch, capsys)
    assert_one_error_line(status, err, message)
    assert snapshot(inputs) + snapshot(tmp_path) == before


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_distill_report_to_without_its_package_is_one_error_line_before_any_model_loads(
        report_to, inputs, tmp_path, monkeypatch, capsys, no_model_loads):
    monkeypatch.setitem(sys.modules, report_to, None)  # as if not installed: find_spec and import fail
    before = snapshot(inputs) + snapshot(tmp_path)
    status, err = run_in_process(distill, args_of(train_base(inputs, tmp_path), {"report_to": report_to}, inputs,
                                                  tmp_path), monkeypatch, capsys)
    assert_one_error_line(status, err, f"report_to={report_to} needs the {report_to} package: pip install {report_to}")
    assert snapshot(inputs) + snapshot(tmp_path) == before


# report.py

def entry(name, af=0.5, raw=0.5):
    """A registry line as gentraces.py writes it, its role and row those that pipeline.sh's name implies."""
    import migrate_registry
    return json.dumps(dict(name=name, data_split="gsm8k_test", model="m", tau=0.0, lam=0.0, eps=0.0, n=10,
                           raw_accuracy=raw, af_accuracy=af, **migrate_registry.fields_of(name)))


def registry(*lines):
    def make(inputs, tmp_path):
        (tmp_path / "metadata").mkdir(exist_ok=True)
        (tmp_path / "metadata" / "trace_registry.jsonl").write_text("".join(line + "\n" for line in lines))
        return []
    return make


TWO_SERIES = [entry(f"eval_{who}_{row}", acc, acc) for who in ("teacher", "student")
              for row, acc in ((ADS, 0.5), (ADS.replace("lam5", "lam9"), 0.3),
                               (TEMPERATURE, 0.6), (TEMPERATURE.replace("tau1.5", "tau1.8"), 0.4))]


def report_dir_as(kind):
    def make(inputs, tmp_path):
        registry(entry(f"eval_teacher_{ADS}"), entry(f"eval_student_{ADS}"))(inputs, tmp_path)
        (tmp_path / kind).mkdir()
        return []
    return make


def registry_as_a_directory(inputs, tmp_path):
    (tmp_path / "metadata" / "trace_registry.jsonl").mkdir(parents=True)
    return []


REPORT_CASES = [
    ("no_exp_dir_flag", lambda i, t: ["--metric", "raw"], "the following arguments are required: --exp-dir"),
    ("exp_dir_missing", lambda i, t: ["--exp-dir", str(t / "none")], "exp_dir must be an existing directory"),
    ("exp_dir_is_a_file", lambda i, t: ["--exp-dir", str(i / "a_file")], "(it is a file)"),
    ("metric_unknown", lambda i, t: ["--exp-dir", str(t), "--metric", "f1"], "metric must be 'af' or 'raw', got 'f1'"),
    ("unknown_flag", lambda i, t: ["--exp-dir", str(t), "--grid", "tiny"], "unrecognized arguments: --grid tiny"),
    ("extra_argument", lambda i, t: ["--exp-dir", str(t), "exp"], "unrecognized arguments: exp"),
    ("registry_missing", lambda i, t: ["--exp-dir", str(t)], "registry not found"),
    ("registry_is_a_directory", registry_as_a_directory, "registry not found"),
    ("registry_empty", registry(), "has no grid-row evals"),
    ("registry_without_grid_rows", registry(entry("holdout"), entry("eval_teacher_base")), "has no grid-row evals"),
    ("line_not_json", registry(entry("holdout"), '{"name": "eval_'), "trace_registry.jsonl:2: malformed registry line"),
    ("line_not_an_object", registry("[1, 2]"), "trace_registry.jsonl:1: malformed registry line"),
    ("line_without_name", registry('{"n": 3}'), "trace_registry.jsonl:1: malformed registry line"),
    ("accuracy_text", registry(entry(f"eval_teacher_{ADS}", af="abc")), "af_accuracy must be a number in [0, 1]"),
    ("accuracy_above_one", registry(entry(f"eval_teacher_{ADS}", raw=50)), "raw_accuracy must be a number in [0, 1]"),
    ("eval_parquets_missing", registry(*TWO_SERIES), ".parquet is missing"),
    ("report_md_is_a_directory", report_dir_as("report.md"), "report.md must be the path of a file to write"),
    ("plot_is_a_directory", report_dir_as("tradeoff.png"), "tradeoff.png must be the path of a file to write"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in REPORT_CASES], ids=[c[0] for c in REPORT_CASES])
def test_report_bad_input_is_one_error_line_and_writes_nothing(make, message, inputs, tmp_path, monkeypatch, capsys):
    argv = make(inputs, tmp_path) or ["--exp-dir", str(tmp_path)]
    before = snapshot(tmp_path)
    status, err = run_in_process(report, argv, monkeypatch, capsys)
    assert_one_error_line(status, err, message)
    assert snapshot(tmp_path) == before


# grid.py

GRID_CASES = [
    (["--grid", "nope"], "--grid must be one of paper, shapes, synth, tiny or a file of rows, got 'nope'"),
    (["--grid"], "argument --grid: expected one argument"),
    (["--shard", "abc"], "argument --shard: invalid int value: 'abc'"),
    (["--shard", "1.5"], "argument --shard: invalid int value: '1.5'"),
    (["--shard", "nan"], "argument --shard: invalid int value: 'nan'"),
    (["--shard", "-1"], "--shard must be in [0, 1), got -1"),
    (["--shard", "2", "--num-shards", "2"], "--shard must be in [0, 2), got 2"),
    (["--num-shards", "0"], "--num-shards must be >= 1, got 0"),
    (["--num-shards", "-3"], "--num-shards must be >= 1, got -3"),
    (["--num-shards", "abc"], "argument --num-shards: invalid int value: 'abc'"),
    (["--num-shards", "1e3"], "argument --num-shards: invalid int value: '1e3'"),
    (["--shard="], "argument --shard: invalid int value: ''"),
    (["--grid=", "tiny"], "unrecognized arguments: tiny"),
    (["--sharding", "1"], "unrecognized arguments: --sharding 1"),
    (["paper"], "unrecognized arguments: paper"),
]


@pytest.mark.parametrize("argv,message", GRID_CASES, ids=[" ".join(c[0]) for c in GRID_CASES])
def test_grid_bad_argument_is_one_error_line_and_prints_no_row(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        grid.main(argv)
    out, err = capsys.readouterr()
    assert_one_error_line(e.value.code, err, message)
    assert out == ""


# the same, as real processes: one line on stderr, exit 2, nothing written, no model loaded (the hook
# makes a model load exit 1 with its own message)

HOOKED = ("import runpy, sys, utils\n"
          "def refuse(*args, **kwargs):\n"
          "    sys.exit('a model was loaded before the bad setting was reported')\n"
          "utils.load_model = refuse\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_script(script, argv):
    return subprocess.run([sys.executable, "-c", HOOKED, str(ROOT / script), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=300)


SUBPROCESS_CASES = [
    ("gentraces.py", gen_base, GEN_CASES, ("lam_not_a_number", "eps_inf", "trace_name_escapes", "data_lacks_a_field")),
    ("save_grad.py", grad_base, GRAD_CASES, ("batch_size_fractional", "traces_lack_a_column")),
    ("distill.py", train_base, TRAIN_CASES, ("warmup_ratio_text", "target_modules_absent")),
]


# each process starts torch (3-9 s on 2 cores): the first case of each script runs in the fast tier
@pytest.mark.parametrize("script,base,name", [
    pytest.param(s, b, n, id=f"{s}-{n}", marks=() if n == names[0] else pytest.mark.slow)
    for s, b, cases, names in SUBPROCESS_CASES for n in names])
def test_bad_setting_in_a_real_process_is_one_line_and_exit_2(script, base, name, inputs, tmp_path):
    cases = next(cases for s, _, cases, _ in SUBPROCESS_CASES if s == script)
    bad, message = next(c[1:] for c in cases if c[0] == name)
    before = snapshot(inputs) + snapshot(tmp_path)
    res = run_script(script, args_of(base(inputs, tmp_path), bad, inputs, tmp_path))
    assert_one_error_line(res.returncode, res.stderr, message)
    assert snapshot(inputs) + snapshot(tmp_path) == before


def test_report_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    res = run_script("report.py", ["--exp-dir", str(tmp_path)])
    assert_one_error_line(res.returncode, res.stderr, "registry not found")
    assert snapshot(tmp_path) == []


def test_grid_in_a_real_process_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, str(ROOT / "grid.py"), "--shard", "abc"], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert_one_error_line(res.returncode, res.stderr, "invalid int value: 'abc'")
    assert res.stdout == ""


# pipeline.sh: the whole grid's settings are checked before the first launch; a worker's error under
# the launcher is one line with exit status 2

LAUNCH_TWO = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def run_driver(driver, inputs, tmp_path, **env):
    bin_dir = str(Path(sys.executable).parent)  # the drivers call `python` and `accelerate`: this interpreter's
    models = {"TEACHER": inputs / "teacher", "PROXY": inputs / "teacher", "STUDENT": inputs / "student",
              "STUDENT_TOKENIZER": inputs / "student"} if driver == "pipeline.sh" else {}
    env = {**ENV, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "EXP_DIR": str(tmp_path / "exp"),
           "GRID": "tiny", "LAUNCH": LAUNCH_TWO, **{k: str(v) for k, v in {**models, **env}.items()}}
    return subprocess.run(["bash", str(ROOT / driver)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_a_typo_in_gen_args_fails_the_pipeline_before_stage_1(inputs, tmp_path):
    res = run_driver("pipeline.sh", inputs, tmp_path, GEN_ARGS=f"data_dir={inputs / 'data'} lamda=0.1")
    # one line, although every gentraces.py command of the grid carries the typo
    assert_one_error_line(res.returncode, res.stderr,
                          "gentraces.py: unknown config key 'lamda' (did you mean 'lam'?)")
    assert "== " not in res.stderr and not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_every_stage_is_checked_and_each_problem_is_one_line(inputs, tmp_path):
    res = run_driver("pipeline.sh", inputs, tmp_path, GEN_ARGS="top_p=abc", GRAD_ARGS="batch_size=0",
                     TRAIN_ARGS="lr_scheduler=cosin", REPORT_ARGS="--metric f1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [line.split(":")[1] for line in res.stderr.splitlines()] == \
        [" gentraces.py", " save_grad.py", " distill.py", " report.py"]
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_a_worker_error_under_the_launcher_is_one_line_and_exit_2(inputs, tmp_path):
    """The settings pass the check, but no prompt fits max_prompt_length: both workers stop with the same
    error, torchrun adds its traceback, and the terminal shows the stage and one error line."""
    res = run_driver("pipeline.sh", inputs, tmp_path, GEN_ARGS=f"data_dir={inputs / 'data'} max_prompt_length=2")
    lines = [line for line in res.stderr.splitlines() if not line.startswith("== ")]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: no prompts left in gsm8k_holdout"), res.stderr[-3000:]
    assert "holdout traces" in res.stderr and "Traceback" not in res.stderr
    log = (tmp_path / "exp" / "logs" / "holdout_traces.log").read_text()
    assert "error: no prompts left" in log and "Traceback" in log  # the launcher's report is kept in the log


def fake_assets(inputs, tmp_path):
    """A folder make_assets.py takes as built, holding the test's tokenizers and models."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / ".complete").write_text("")
    for name, source in (("teacher", "teacher"), ("proxy", "teacher"), ("student", "student")):
        (assets / name).symlink_to(inputs / source)
    (assets / "data").symlink_to(inputs / "data")
    return assets


@pytest.mark.slow
def test_the_tiny_wrapper_passes_the_users_grid_on(inputs, tmp_path):
    res = run_driver("pipeline_tiny.sh", inputs, tmp_path, TINY_ASSETS=fake_assets(inputs, tmp_path), GRID="nope")
    assert_one_error_line(res.returncode, res.stderr, "--grid must be one of paper, shapes, synth, tiny or a file of rows, got 'nope'")


@pytest.mark.parametrize("driver,variable", [("pipeline_tiny.sh", "TEACHER"), ("pipeline_tiny.sh", "DATASET"),
                                             ("pipeline_synth.sh", "STUDENT"), ("pipeline_math.sh", "DATASET"),
                                             ("pipeline_mmlu.sh", "DATASET"), ("pipeline_shapes.sh", "PROXY"),
                                             ("pipeline_shapes.sh", "GRID")])
def test_a_wrapper_refuses_a_variable_it_must_set(driver, variable, inputs, tmp_path):
    res = run_driver(driver, inputs, tmp_path, **{variable: "gsm8k_or_a_model_of_mine"})
    assert_one_error_line(res.returncode, res.stderr, f"{driver} sets {variable}=")
    assert not (tmp_path / "exp").exists()
