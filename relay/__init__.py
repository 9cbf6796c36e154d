"""wavespeed-relay: a transparent streaming relay for AI inference APIs.

Importing the package does nothing; build an app with :func:`relay.app.create_app` and
serve it with :func:`relay.server.serve` (or a :func:`relay.server.make_runner` runner).
"""

__version__ = "0.1.0"
