"""Evaluation: perplexity on indexed data (``mom-eval``) and downstream fine-tuning on
GLUE/XSUM-style tasks (``mom-finetune``)."""
