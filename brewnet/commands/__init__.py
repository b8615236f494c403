"""Subcommands of `brewnet`; each module lists its click commands in COMMANDS."""
