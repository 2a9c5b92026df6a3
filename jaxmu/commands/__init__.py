"""The subcommands of the `jaxmu` command, one module each (see `jaxmu.cli`)."""
