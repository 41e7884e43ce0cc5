"""The benchmarks' real model shapes (a DeepSeek-R1-Distill-Qwen-7B-shaped teacher, Qwen2.5-3B-shaped
proxies) and the rates measured on the H200 they were run on; shared by bench_decode.py and
bench_gemm.py."""

VOCAB = 151665            # ids the Qwen tokenizer defines; wider logits are padding rows
COPY_BW = 4.3e12          # bytes/s, device-to-device copy measured on this H200 (read + write)
MATMUL_PEAK = 790e12      # FLOP/s, bf16 8192^3 matmul measured on this H200

TEACHER = dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
               max_position_embeddings=131072, tie_word_embeddings=False)
PROXY = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
             num_key_value_heads=2, intermediate_size=11008, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
             max_position_embeddings=32768, tie_word_embeddings=True)


def step_matmuls(cfg, stacked):
    """The matmuls of one decode step of `stacked` models of config cfg through stack.Stack:
    (name, models stacked, N, K, calls per step) for an (M, K) x (K, N) product per model."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    dim = cfg.get("head_dim") or hidden // heads
    qkv = (heads + 2 * cfg["num_key_value_heads"]) * dim
    layers, inter = cfg["num_hidden_layers"], cfg["intermediate_size"]
    return [("qkv", stacked, qkv, hidden, layers), ("o", stacked, hidden, heads * dim, layers),
            ("gate_up", stacked, 2 * inter, hidden, layers), ("down", stacked, hidden, inter, layers),
            ("head", stacked, cfg["vocab_size"], hidden, 1)]


def matmul_floor_s(rows, stacked, n, k, bytes_per_weight=2):
    """Seconds one such matmul takes at best: the larger of reading its weights once and its FLOPs."""
    return max(stacked * n * k * bytes_per_weight / COPY_BW, 2 * stacked * rows * n * k / MATMUL_PEAK)
