"""Quality evaluation of LCLMs and baselines (`python -m bench.quality`)."""
