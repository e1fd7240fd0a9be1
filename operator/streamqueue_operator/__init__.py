"""streamqueue operator: scales Redis Streams worker Deployments on consumer-group backlog."""

from importlib.metadata import version

__version__ = version("streamqueue-operator")  # the package's own version (pyproject.toml, = VERSION)
