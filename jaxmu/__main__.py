"""``python -m jaxmu <command> [flags]``: the same as the `jaxmu` command."""

from jaxmu import cli

cli.main()
