"""The `famjax` command's subcommands, one module each: its absl flags and a `main` that parses
nothing else and prints; the logic lives in the rest of famjax. common.py holds what they share."""
