"""The async client: the source that `make unasync` turns into pagemeter_client._sync."""
