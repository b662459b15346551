"""Evaluation of a (pruned) model object: perplexity on WikiText-2 / C4 (perplexity.py) and
lm-eval zero-shot tasks (zeroshot.py).

May import: torch, transformers, lm-eval, the package's foundations (errors, registry,
data, models) and engine/. Never a method or records/.
"""
