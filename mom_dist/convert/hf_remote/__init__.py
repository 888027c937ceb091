"""Files copied into a transformers export (``mom-convert to-hf``), loaded with ``trust_remote_code``.

They import only torch, transformers and sentencepiece - never mom_dist (a test parses them and
runs them in a venv without it) - so the export works wherever transformers does.
"""
