"""The HTTP/JSON API: pagemeter's RPCs over HTTP, routed by the contract (docs/http.md)."""
