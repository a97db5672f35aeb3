"""driftloop: a closed-loop adaptive MLOps pipeline.

Importing the package does no work: settings are read at the edges
(CLI, flow entry, service start) through :func:`driftloop.settings.get_settings`.
The one thing it sets up is a finder that makes the first ``import feast`` skip Feast's
import-time typeguard instrumentation (see :mod:`driftloop._feast_import`).
"""

from driftloop import _feast_import

__version__ = "0.1.0"

_feast_import.install()
