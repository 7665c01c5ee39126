"""`python -m flows` is the installed `gist` command."""

from flows.cli import app

app(prog_name="gist")
