"""`python -m experiments.X` in a checkout: each module runs the `famjax` subcommand of its name
(isoflop: `famjax study`). Not part of the wheel."""
