"""CLI subcommand groups (see vqad.cli)."""
