"""``sat-train``: dense-vs-SAT training of a causal LM through the Hugging Face ``Trainer`` (see ``cli.py``).

Library functions the CLI is made of: ``data`` (offline corpus, tokenization, batching), ``model`` (loading a model
directory or GGUF file), ``runner`` (one timed Trainer run + dense evaluation), ``compare`` (table, JSON, plot).
"""
