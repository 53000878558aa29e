"""Shared pieces of the LoRA-vs-full-fine-tuning study: config, data, modeling, training, metrics, reporting."""

__version__ = "0.1.0"
