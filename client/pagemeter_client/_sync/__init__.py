"""The blocking client, generated from pagemeter_client._async by `make unasync`."""
