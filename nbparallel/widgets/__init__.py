"""Views of telemetry and progress; the only package that imports ipywidgets."""

__all__: list[str] = []  # import the view you need: widgets.dashboard, widgets.progress
