"""Code that runs inside engine processes. Only this package and ``pool.py`` know ipyparallel."""
