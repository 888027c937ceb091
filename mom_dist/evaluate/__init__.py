"""Downstream evaluation: fine-tuning on GLUE/XSUM-style tasks (``mom-finetune``)."""
