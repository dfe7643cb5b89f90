"""The storage backends, one module each: `memory`, `sqlite`, `kafka` (and their private helpers).

The interfaces they implement live apart, in `choreo.store`; `choreo.store.open_store`
imports a backend only when a URL names it, so a backend's dependencies are needed only
by the users of that backend.
"""
