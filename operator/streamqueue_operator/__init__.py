"""streamqueue operator: scales Redis Streams worker Deployments on consumer-group backlog."""

__version__ = "0.1.0"
