"""Side-by-side benchmarks against transformers (the reference implementation).

    python -m benchmarks [suite ...] [--quick] [--device cpu|cuda] [--out FILE.json]

Speed suites live in `speed.py` (step, inference, e2e, pretrain) and `preprocess.py`; the accuracy
comparison (`glue_accuracy.py`) and the SQuAD feature round trip (`squad_roundtrip.py`) are scripts of
their own. Measured figures, with the command and machine of each, are in BENCHMARKS.md.
"""
