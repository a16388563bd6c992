"""tunesmith: fine-tune, distil, evaluate and ship language models on the hardware you have."""

__version__ = "0.1.0"
