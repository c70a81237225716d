"""Training data: the offline corpus (corpus.py, prepare.py, shards.py) and synthetic tasks (synthetic.py)."""
