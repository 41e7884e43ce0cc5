"""How much memory does one synth distill step need by itself? A forward and backward pass of a
randomly initialised student of the synth profile's shape (Llama, 24.8M parameters, fp32) on a batch
of 64 sequences of 200 tokens (the longest synth prompt plus trace is about 200), half of them padded,
on CPU, reporting the peak resident memory. On the GPU the 11 training distill stages held 6-29 GiB
each (stages.log); this separates what a step needs from what the CUDA caching allocator kept.

    OMP_NUM_THREADS=2 python results/synth/v3/analysis/distill_memory_probe.py
"""
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=672, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
ids = torch.randint(0, cfg.vocab_size, (64, 200))
mask = torch.ones_like(ids)
mask[::2, :40] = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
start = time.time()
model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; peak resident memory "
      f"{peak:.2f} GB, {peak - before:.2f} GB above the model's {before:.2f} GB; {time.time() - start:.0f} s")
