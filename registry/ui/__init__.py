"""``xai ui``: a local web explorer over the registry (Starlette + uvicorn, no JavaScript build step)."""
