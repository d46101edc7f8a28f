from rkl.cli import app

app()
