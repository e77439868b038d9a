"""The reproduction study: `python -m aacp_jax.study --config=configs/study.py[:demo] --workdir=DIR`.

cells.py (the plan and each cell's key), runner.py (run, skip, resume, record), execute.py (what
a cell does: pretraining or one fine-tuning run), tables.py (Table 5, Table 6, data needed to
match, from results.jsonl rows), figures.py (the PNGs and clusters.json), __main__.py (the CLI).
"""
