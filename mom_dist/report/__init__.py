"""Reports of a finished (or running) run: figures and one HTML page from its output directory.

Reads ``metrics.jsonl`` and ``config.json`` only (``run_data``); never imports the trainer.
``build_report(run_dir, out_dir)`` draws the figures (``figures``) and writes the page
(``page``); ``mom-report`` (``mom_dist.cli.report``) is its command line.
"""
