"""rft-bench: a benchmark harness for robust fine-tuning of CLIP models."""

__version__ = "0.1.0"
