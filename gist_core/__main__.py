"""`python -m gist_core` is the `gist` command."""

from gist_core.cli import app

app(prog_name="gist")
