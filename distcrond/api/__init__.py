"""The REST API every peer serves: a falcon app over the stores, run under gunicorn.

``app.py`` builds the app from its collaborators, ``resources.py`` holds one
class per route, ``openapi.py`` describes them, and ``server.py`` runs the app
under gunicorn in a process of its own (the daemon spawns it).
"""

from distcrond.api.app import ROUTES, create_app

__all__ = ["ROUTES", "create_app"]
