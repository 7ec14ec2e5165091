"""The web dashboard at /dashboard: server-rendered pages for people, logged in with an API key.

Every page acts as the session's principal through the same service functions the API routes
call, so the dashboard and the API can never disagree on who may see or do what.
"""

from public_api.dashboard.routes import router
from public_api.dashboard.sessions import DashboardSessionCache

__all__ = ["DashboardSessionCache", "router"]
