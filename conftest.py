"""Repository-root conftest: puts this checkout first on sys.path (before any installed copy)."""
