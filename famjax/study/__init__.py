"""The experiment machinery: the IsoFLOP plan, the sweep that trains it, run records, the memory
plan, a study's remembered config and its publication. famjax.pipeline runs a study end to end
with famjax.analysis on top."""
