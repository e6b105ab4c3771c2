"""The named configurations, shipped in the wheel: `train.py` (one run: tiny, small, medium, ...)
and `isoflop.py` (a study: tiny, small, medium, laws, paper). `--config=NAME` picks one."""
