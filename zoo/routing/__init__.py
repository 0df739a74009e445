"""Shared routing primitives: routers, dispatch/combine, auxiliary losses, routing metrics (pure functions)."""
