"""GISTEmbed pipeline core: pure, typed logic shared by the CLI, DVC stages and Prefect flows.

Nothing here runs at import time; heavy libraries are imported inside the functions that need them.
"""

__version__ = "0.1.0"
