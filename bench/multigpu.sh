#!/usr/bin/env bash
# Two GPUs, data parallel: engine throughput with 1 and 2 processes, save_grad on a real-shape
# proxy with 1 and 2 processes, and the tiny pipeline with 2 GPU processes, sampled and with argmax
# decoding (compared with CPU runs of the same assets by bench/compare_tiny.py). Run on a 2-GPU
# machine from the repository root:
#
#   OUT=bench/results/x2 ASSETS=tiny_assets bash bench/multigpu.sh            # all parts
#   PARTS=tiny ASSETS=tiny_assets bash bench/multigpu.sh                       # one part: engine, grad or tiny
set -euo pipefail
PARTS=${PARTS:-engine,grad,tiny}
OUT=${OUT:-bench/results/x2}
ASSETS=${ASSETS:-tiny_assets}
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
# NVLink multicast stays off on shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LAUNCH2=(accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no)

if [[ ,$PARTS, == *,engine,* ]]; then
echo "== engine, ADS, batch 192 per process: 1 then 2 processes"
python bench/bench_dp.py --out "$OUT/dp1.json"
"${LAUNCH2[@]}" bench/bench_dp.py --out "$OUT/dp2.json"
fi

if [[ ,$PARTS, == *,grad,* ]]; then
echo "== save_grad on a Qwen2.5-3B-shaped proxy: 1 then 2 processes"
python - "$SCRATCH/proxy" "$ASSETS/teacher" <<'PY'
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
out, tok, sys.argv = sys.argv[1], sys.argv[2], sys.argv[:1]  # bench_decode parses argv on import
sys.path.insert(0, "bench")
from bench_decode import PROXY
torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen2ForCausalLM._from_config(Qwen2Config(**PROXY), dtype=torch.bfloat16)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(tok).save_pretrained(out)
PY
python bench/fake_traces.py --tokenizer "$ASSETS/teacher" --rows 256 --out "$SCRATCH/holdout"
GRAD=(proxy="$SCRATCH/proxy" traces="$SCRATCH/holdout" batch_size=8 max_length=512)
python save_grad.py "${GRAD[@]}" out="$SCRATCH/g1.safetensors"
"${LAUNCH2[@]}" save_grad.py "${GRAD[@]}" batch_size=4 out="$SCRATCH/g2.safetensors"
python - "$SCRATCH/g1.safetensors" "$SCRATCH/g2.safetensors" "$OUT/grad_1v2.json" <<'PY'
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
diff = sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5
norm = sum(a[k].double().pow(2).sum().item() for k in a) ** 0.5
worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
meta = [safe_open(p, "pt").metadata() for p in sys.argv[1:3]]
res = dict(keys_equal=sorted(a) == sorted(b), rel_l2_diff=diff / norm, grad_norm=norm, max_abs_diff=worst[0],
           worst_tensor=worst[1], allclose=all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a),
           metadata_1proc=meta[0], metadata_2proc=meta[1])
json.dump(res, open(sys.argv[3], "w"), indent=1)
print(json.dumps(res))
PY
fi

if [[ ,$PARTS, == *,tiny,* ]]; then
echo "== tiny pipeline, 2 GPU processes, fp32: sampled as configured, and argmax decoding (top_k=1)"
tiny() {
    EXP_DIR=$SCRATCH/$1 TINY_ASSETS=$ASSETS LAUNCH="${LAUNCH2[*]}" GEN_ARGS="dtype=float32 engine=eager $2" \
        TRAIN_ARGS="dtype=float32" bash pipeline_tiny.sh > "$OUT/$1.log" 2>&1
}
tiny tiny_sampled "" &
sampled=$!
tiny tiny_argmax "top_k=1" &
argmax=$!
wait "$sampled"
wait "$argmax"
# what bench/compare_tiny.py reads: trace parquets, the gradient, the registry and the report
tar czf "$OUT/tiny_gpu.tgz" -C "$SCRATCH" --exclude models --exclude assets tiny_sampled tiny_argmax
fi
