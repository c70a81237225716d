"""The engine: answering a question about a document with any method (full context, LCLM, LCLM +
EXPAND, the KV-cache presses), with its latents, caches, models, measurements and memory guard.
The CLI, the studio's state (app/studio/) and the benchmarks call it; it calls none of them."""
