"""bert-dist: a from-scratch BERT that trains through Hugging Face Accelerate, CPU to cluster."""

__version__ = "0.1.0"
