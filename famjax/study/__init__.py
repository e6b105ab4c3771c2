"""The experiment machinery: the study's config, the IsoFLOP plan (isoflop.py), the sweep that
trains it, run records, a study's saved config and its publication. famjax.pipeline runs a study
end to end with famjax.analysis on top; famjax.hardware plans its memory and cost."""
