"""Running the process: logs, metrics, health, exporter, the embedded store, limits."""
