"""Webhook delivery: the dispatchers (docs/webhooks.md)."""
