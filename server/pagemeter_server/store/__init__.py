"""Redis: keys, the Lua scripts and their loading, typed replies, connections for every mode."""
