"""wavespeed-relay: a transparent streaming relay for AI inference APIs.

Importing the package does nothing; build an app with :func:`relay.app.create_app`.
"""

__version__ = "0.1.0"
