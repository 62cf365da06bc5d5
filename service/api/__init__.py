"""The HTTP API: dependencies (auth, limits), routes and schemas per resource."""
