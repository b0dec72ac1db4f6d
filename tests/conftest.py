"""Suite-wide settings, fixed before anything imports torch or the definitions. Both are
defaults: a value already in the environment wins.

- One torch CPU thread, here and in every ``msif`` process a test starts (they inherit the
  environment). The test models are tiny and gain little from threads, and on a busy 2-core
  machine threads waiting for each other made whole tests several times slower.
- ``MSIF_FIDELITY=small``: the ``ekfac_fidelity`` asset at its few-second size, so tests that
  materialize the whole lineage do not spend most of their time on the fidelity study. Its
  full size runs where fidelity is the subject: tests/pipeline/test_fidelity_eval.py.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("MSIF_FIDELITY", "small")

import torch  # noqa: E402  (after the environment above)

if os.environ["OMP_NUM_THREADS"].isdigit():
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
