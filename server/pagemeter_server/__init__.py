"""pagemeter server: gRPC quota enforcement on Redis Lua scripts."""
