"""Is the engine's first prefill in a process slower than later ones? Three engine.generate calls in a
row on one H200 (ADS, batch 192, prompt 256, 32 new tokens, eager kernels), each timing its prefill.

    cd bench && python prefill_warmup.py
"""
import sys
import time

sys.argv = ["x", "--new", "32"]  # bench_decode parses its arguments on import
import bench_decode as B  # noqa: E402

t0 = time.time()
teacher = B.build(B.TEACHER, 0)
plus = B.build(B.PROXY, 1)
minus = B.build(B.PROXY, 2)
print("built", round(time.time() - t0, 1), flush=True)
models = B.DecodeModels(teacher=teacher, vocab_size=B.VOCAB, eos_ids=[], pad_id=0, plus=plus, minus=minus)
for i in range(3):
    r = B.time_engine(models, B.ADS, 192, compile_layers=False)
    print(i, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
              if k in ("prefill_s", "setup_s", "decode_s", "ms_per_step")}, flush=True)
