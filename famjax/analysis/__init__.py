"""A study's analysis: typed values in (a Plan, run records), a typed Report out (analyze), the
live fit during a sweep, the gamma grid, measured Efficiency Leverage, and report.md/json and
plots written from the Report (render, plots)."""
