"""Is the engine's first prefill in a process slower than later ones, and is cuDNN's attention the
cause? Three engine.generate calls in a row on one H200 (ADS, batch 192, prompt 256, 32 new tokens,
eager kernels), each timing its prefill; --sdpa torch lets prefill attention use every SDPA kernel,
cuDNN's listed first, --sdpa engine the engine's own list (no cuDNN).  Run
each choice in a process of its own, since only the first call in a process is cold.

    cd bench && python prefill_warmup.py --sdpa torch && python prefill_warmup.py --sdpa engine
"""
import argparse
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sdpa", choices=["torch", "engine"], default="engine", help="prefill attention kernels")
choice = parser.parse_args().sdpa
sys.argv = ["x", "--new", "32"]  # bench_decode parses its arguments on import
import bench_decode as B  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

backends = B.engine_kernels.PREFILL_BACKENDS
if choice == "torch":
    backends = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
t0 = time.time()
teacher = B.build(B.TEACHER, 0)
plus = B.build(B.PROXY, 1)
minus = B.build(B.PROXY, 2)
print(f"sdpa={choice}: {[b.name for b in backends]}; built in {time.time() - t0:.1f}s", flush=True)
models = B.DecodeModels(teacher=teacher, vocab_size=B.VOCAB, eos_ids=[], pad_id=0, plus=plus, minus=minus, eps=B.ADS.eps)
for i in range(3):
    r = B.time_engine(models, B.ADS, 192, compile_layers=False, prefill_backends=backends)
    print(i, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
              if k in ("prefill_s", "setup_s", "decode_s", "ms_per_step")}, flush=True)
