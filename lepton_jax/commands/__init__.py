"""CLI subcommands, one module per pipeline stage; each module has ``register(subparsers)``."""
