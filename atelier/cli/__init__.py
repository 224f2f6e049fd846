"""`atelier` — the command line: one module per command (group), one HTTP helper (http.py).

`serve` runs the server; `generate`, `poem`, `image`, `models`, `jobs` and `ps` are HTTP clients of it
(ATELIER_URL, ATELIER_API_KEY); `keys`, `audit`, `db` and `train` work on the local registry (ATELIER_HOME) directly,
so an operator who lost the admin key can still mint one.
"""

from __future__ import annotations

import typer

from atelier.cli import audit, db, generate, image, jobs, keys, models, music, poem, ps, serve, train

app = typer.Typer(help="Atelier: creative models as a service.", no_args_is_help=True, add_completion=False)
# Typer lists commands, then groups, each in registration order.
app.command()(serve.serve)
app.command()(generate.generate)
app.command()(poem.poem)
app.command()(music.music)
app.add_typer(models.app, name="models")
app.command()(ps.ps)
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(db.app, name="db")
app.add_typer(jobs.app, name="jobs")
app.command()(train.train)
app.command()(image.image)


def main() -> None:
    app()
