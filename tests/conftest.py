"""Shared fixtures: tiny random models built from configs (no Hub), sized for CPU tests."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# tiny models run fastest on one thread, and CI's two cores are shared with subprocesses: several
# busy-waiting OpenMP pools on two cores make every step many times slower
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def tiny_qwen(vocab_size, seed, hidden=32, layers=2, sharpen=40.0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init, so distributions are not flat
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


@pytest.fixture(scope="session")
def teacher():
    return tiny_qwen(vocab_size=80, seed=0)


@pytest.fixture(scope="session")
def proxy():
    return tiny_qwen(vocab_size=72, seed=1, hidden=16)


@pytest.fixture
def chromium():
    """Headless Chromium is a test dependency that CI installs (.ci/run): missing there is a failure."""
    import shutil
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser tests (.ci/run installs it)")
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); CI runs these tests")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny teacher/proxy/student and GSM8K-schema data from make_assets.py (built once). The build
    trains the teacher for over a minute on 2 cores, so every test that uses it is marked slow."""
    import subprocess
    if os.environ.get("TINY_ASSETS"):  # reuse a prebuilt copy while iterating on tests
        return Path(os.environ["TINY_ASSETS"])
    out = tmp_path_factory.mktemp("tiny") / "assets"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "make_assets.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def untrained_assets(tmp_path_factory):
    """tiny_assets' layout (teacher/, proxy/ sharing its tokenizer, data/gsm8k/) with untrained models,
    built in about a second: the fast tier's stand-in where a test needs a stage to run, not a teacher
    that solves problems."""
    import trace_fixtures as tf
    root = tmp_path_factory.mktemp("untrained") / "assets"
    tok = tf.make_tokenizer(tf.TEACHER)
    tf.save_proxy(root / "teacher", tok, seed=0)
    tf.save_proxy(root / "proxy", tok, seed=1, hidden=16)
    problems = [{"question": tf.question(a, b, word), "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                for a in range(8) for b in range(4) for word in tf.WORDS[:2]]
    tf.write_jsonl(root / "data" / "gsm8k" / "train.jsonl", problems[::2])
    tf.write_jsonl(root / "data" / "gsm8k" / "test.jsonl", problems[1::2])
    return root
