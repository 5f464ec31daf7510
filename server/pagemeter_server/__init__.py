"""pagemeter server: gRPC quota enforcement on Redis Lua scripts."""

__version__ = "0.1.0"
