"""The HTTP layer: routes, request reading, problem documents, OpenAPI. Only this and app.py import starlette."""
