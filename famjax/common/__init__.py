"""What every part of famjax shares: safe files (files.py) and field checks (fields.py)."""
