"""Subcommands of ``python -m workbench``: each module defines ``register(subparsers)``, which adds a parser
whose ``run`` default (``parser.set_defaults(run=fn)``) receives the parsed arguments and returns an exit code."""
