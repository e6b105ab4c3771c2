"""Hugging Face checkpoints from and to local directories: configs (configs.py), weights
(weights.py), a dense checkpoint imported as a family (checkpoint_import.py) and an exit
exported as a Llama or Qwen2 directory (checkpoint_export.py)."""
