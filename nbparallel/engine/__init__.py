"""Code that runs inside engine processes. Only this package and ``pool.py`` know ipyparallel."""

__all__: list[str] = []  # its modules are sent to engines by reference, not imported from here
