"""Views of telemetry and progress; the only package that imports ipywidgets."""
