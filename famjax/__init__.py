"""famjax: familial models (one backbone, several exits) trained, measured and fitted in JAX."""
