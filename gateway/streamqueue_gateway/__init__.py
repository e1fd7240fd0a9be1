"""streamqueue-gateway: an OpenAI-compatible HTTP front door of streamqueues (docs/gateway.md)."""
