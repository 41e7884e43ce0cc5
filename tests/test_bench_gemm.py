"""bench/real_shapes.step_matmuls: the matmuls bench_gemm.py times are those of the real models."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from real_shapes import PROXY, TEACHER, matmul_floor_s, step_matmuls  # noqa: E402


@pytest.mark.parametrize("cfg", [TEACHER, PROXY], ids=["teacher", "proxy"])
def test_step_matmuls_cover_every_linear_weight_of_the_real_model(cfg):
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    linears = sorted(m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear))
    # q/k/v and gate/up are one weight each in the Stack: compare weight counts and elements per step
    listed = sum(n * k * calls for _, _, n, k, calls in step_matmuls(cfg, 1))
    assert listed == sum(n * k for n, k in linears)
    assert sum(calls for *_, calls in step_matmuls(cfg, 1)) == 4 * cfg["num_hidden_layers"] + 1


def test_matmul_floor_is_weight_read_at_few_rows_and_flops_at_many():
    few, many = matmul_floor_s(8, 1, 4096, 4096), matmul_floor_s(4096, 1, 4096, 4096)
    assert few == pytest.approx(4096 * 4096 * 2 / 4.3e12)
    assert many == pytest.approx(2 * 4096 ** 3 / 790e12)
    assert matmul_floor_s(192, 2, 4096, 4096) == pytest.approx(2 * matmul_floor_s(192, 1, 4096, 4096))
