"""The commands, one module per area: each takes the parsed arguments and returns the exit code."""
