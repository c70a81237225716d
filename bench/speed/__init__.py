"""Speed and memory benchmark: TTFT (split as app/engine/measure.py defines it), compression time,
decode tokens per second, peak memory, KV-cache bytes and positions of an LCLM (cold and
cached latents) against full context and kvpress presses (SnapKV, KVzip) at the matched
ratio, over a context-length sweep and the ratios 1:4, 1:8, 1:16.

    python -m bench.speed                  # CPU: the embedded SmolLM2-135M, 1k to 7.5k tokens
    python -m bench.speed --preset cpu-long --name speed-cpu-long   # CPU: 7.5k to 128k tokens
    python -m bench.speed --preset gpu     # GPU: random weights shaped like the paper's pair, 4k to 1M

Modules: analytic (the FLOP limit of the TTFT gain), rigs (what is measured), methods (one
class per method, registered in TIMED_METHODS), sweep (runs, medians, what fits), report (JSON,
plots, Markdown table).
"""
