"""`choreo ui`: a web console that shows every saga, its dead letters and the system's flow.

It needs the optional extra `choreo[ui]` (Starlette and uvicorn). `create_app()` returns
the ASGI application; `choreo ui --store URL --system MODULE:SYSTEM` serves it.
"""

from __future__ import annotations

from choreo.ui.app import create_app

__all__ = ["create_app"]
