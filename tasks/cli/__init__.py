"""The `porter` command line (`tasks.cli.main:main`)."""
