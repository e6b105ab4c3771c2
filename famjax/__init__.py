"""famjax: familial models (one backbone, several exits) trained, measured and fitted in JAX."""

__version__ = "0.2.0"
