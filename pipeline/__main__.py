"""``python -m pipeline`` is the ``anim`` command."""
from pipeline.cli import app

app(prog_name="anim")
