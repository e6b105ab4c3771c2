"""The fitter's engine, internal to famjax.scaling: L-BFGS runs streamed through vmapped lanes,
its one-trial line search, and the stages (descend, polish, refine, restart, screened starts)."""
