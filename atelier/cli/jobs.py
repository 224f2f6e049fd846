"""`atelier jobs`: list, show, cancel and follow training jobs on the server (and the progress bar they share with `train`)."""

from __future__ import annotations

from rich.table import Table
import typer

from atelier.cli.http import KeyOpt, UrlOpt, _settings, call, client, console, fail
from atelier.config import Settings

app = typer.Typer(help="Training jobs on the server: list, show, follow, cancel.", no_args_is_help=True)


@app.command("list")
def jobs_list(url: UrlOpt = None, api_key: KeyOpt = None):
    """Recent jobs."""
    data = call("GET", "/v1/fine_tuning/jobs", url, api_key, params={"limit": 50}).json()["data"]
    table = Table(title="Jobs")
    for col in ("id", "status", "model", "fine_tuned_model", "attempts"):
        table.add_column(col)
    for j in data:
        table.add_row(j["id"], j["status"], j["model"], j["fine_tuned_model"] or "", str(j["attempts"]))
    console.print(table)


@app.command("show")
def jobs_show(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """One job as JSON."""
    console.print_json(data=call("GET", f"/v1/fine_tuning/jobs/{job_id}", url, api_key).json())


@app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """Cancel a queued or running job."""
    call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", url, api_key)
    console.print(f"cancelled {job_id}")


@app.command("follow")
def jobs_follow(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """A progress bar fed by the job's events, until it ends."""
    follow(job_id, _settings(url=url, api_key=api_key))


def _progress():
    """The progress bar of every long CLI command: description, bar, step/total, info, times."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _training_events(progress, task):
    """A local trainer's events → the progress bar (train steps) and printed lines (the rest)."""
    def on_event(e: dict) -> None:
        kind = e["type"]
        if kind == "train":
            rate = f"{e['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in e else f"{e['images_per_s']:.0f} img/s"
            progress.update(task, completed=e["step"], info=f"loss {e['loss']:.4f} · {rate} · lr {e['lr']:.2e}")
        elif kind == "resumed":
            progress.update(task, completed=e["step"])
            progress.console.print(f"resumed from step {e['step']} ({e['path']})")
        elif kind == "eval":
            score = (f"val loss {e['val_loss']:.4f} (ppl {e['val_ppl']:.1f})" if "val_ppl" in e
                     else ", ".join(f"{k} {v:.4f}" for k, v in e.items() if isinstance(v, float)))
            progress.console.print(f"step {e['step']}: {score}" + ("  ★ best" if e["improved"] else ""))
        elif kind == "early_stop":
            progress.console.print(f"early stop at step {e['step']}; best step {e['best_step']}")

    return on_event


def follow(job_id: str, settings: Settings) -> dict:
    """Poll a job's events into the progress bar until it ends; print and return the final job."""
    import time

    progress = _progress()
    after = None
    with client(settings) as c, progress:
        task = progress.add_task(job_id, total=None, info="")
        while True:
            params = {"order": "asc", "limit": 500} | ({"after": after} if after else {})
            events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
            if events.status_code != 200:
                fail(events)
            for e in events.json()["data"]:
                after = e["id"]
                d = e["data"]
                if "train_loss" in d:
                    rate = (f"{d['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in d
                            else f"{d.get('images_per_s', 0):.1f} img/s")
                    progress.update(task, total=d["total_steps"], completed=d["step"],
                                    info=f"loss {d['train_loss']:.3f} · {rate} · lr {d['lr']:.2e}")
                else:
                    progress.console.print(e["message"])
            job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            # Stop only once the job has ended *and* every event has been read, so the last lines are shown.
            if job["status"] in ("succeeded", "failed", "cancelled") and not events.json()["has_more"]:
                break
            time.sleep(0.5)
    color = {"succeeded": "green", "failed": "red"}.get(job["status"], "yellow")
    console.print(f"[{color}]{job_id} {job['status']}[/{color}]" +
                  (f": {job['fine_tuned_model']}" if job["fine_tuned_model"] else "") +
                  (f": {job['error']['message']}" if job.get("error") else ""))
    return job
