"""`python -m aacp_jax.bench prep`: data-preparation throughput and peak RSS (issue 5; placeholder until built)."""


def run(emit):
  raise NotImplementedError('bench prep is not built yet')
