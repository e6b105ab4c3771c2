"""The familial transformer: its config, the Flax NNX model (transformer.py), the logical-axis
sharding rules (sharding.py) and its parameter and FLOP counts (counts.py)."""
