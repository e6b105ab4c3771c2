"""A study's analysis: typed values in (a StudyPlan, run records), a typed Report out
(study_analysis.analyze_study), the live fit during a sweep, the gamma grid, exit placements,
measured Efficiency Leverage, and report.md/json and plots written from the Report (render,
plots)."""
