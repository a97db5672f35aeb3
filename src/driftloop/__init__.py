"""driftloop: a closed-loop adaptive MLOps pipeline.

Importing the package does no work: settings are read at the edges
(CLI, flow entry, service start) through :func:`driftloop.settings.get_settings`.
"""

__version__ = "0.1.0"
