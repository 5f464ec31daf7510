"""pagemeter client: Python SDK (async and sync) and the `pagemeter` CLI."""
