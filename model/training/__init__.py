"""Training LCLMs: the authors' four-stage recipe (`python -m model.training`).

config.py     run and stage settings (YAML files in configs/)
stages.py     the four stages: which parameter groups train
examples.py   training examples: interleaved spans, reconstruction, task data; loss masks
modeling.py   building a trainable LCLM (LoRA or full), the loss forward, saving checkpoints
trainer.py    the loop: accelerate, bf16, gradient checkpointing, checkpoints, resume
smoke.py      a tiny random model and corpus, all four stages on CPU in minutes
data/         the offline corpus (prepare, shards, pack) and synthetic task generators
"""
