"""The ``pigeon`` command line and the demo."""
