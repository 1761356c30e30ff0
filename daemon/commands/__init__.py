"""One module per `nanod` command (see daemon/cli.py)."""
