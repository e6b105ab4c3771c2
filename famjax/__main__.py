"""`python -m famjax SUBCOMMAND ...`: the `famjax` command."""

from famjax import cli

if __name__ == "__main__":
  cli.main()
