"""The Train tab's live view of the current run: status (step, ETA, state and what to do), the loss
plot's data, samples, memory, the final files and the console, rendered from the run's events by
`poll` (the tab's gr.Timer) and `full_view` (page load, run switch, Start / Stop / Resume)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..preflight import format_duration
from . import jobs, remote
from .common import code, dora_note, info, md_escape, series_frame, skip_all
from .header import run_picker
from .monitor import RunMonitor, Status, console_tail, run_status
from .workspace import Session, servable

STATUS_ICONS = {"new": "🟦", "queued": "⏳", "running": "🏃", "stopping": "⏸️", "finished": "✅", "stopped": "⏸️",
                "failed": "❌", "interrupted": "⚠️"}


# -- whose run: a visitor signed in with Hugging Face ----------------------------------------------
def hub_token(oauth_token: gr.OAuthToken | None) -> str | None:
    """The visitor's own token for checkpoint pushes (None: the trainer uses this machine's HF_TOKEN, off a Space)."""
    return oauth_token.token if oauth_token else None


def username(profile: gr.OAuthProfile | None) -> str | None:
    return profile.username if profile else None


# -- the view ---------------------------------------------------------------------------------------
def _monitor(session: Session, run: Path) -> RunMonitor:
    monitors = session.cache.setdefault("monitors", {})
    if run.name not in monitors:
        monitors[run.name] = RunMonitor(run)
    return monitors[run.name]


def poll(session: Session, oauth_token: gr.OAuthToken | None = None, oauth_profile: gr.OAuthProfile | None = None) -> tuple:
    """The timer's tick: new events only; unchanged parts of the page are not sent again."""
    _follow_again(session, oauth_token, oauth_profile)
    return _render(session, force=False)


def page_view(session: Session, oauth_token: gr.OAuthToken | None = None,
              oauth_profile: gr.OAuthProfile | None = None) -> tuple:
    """The whole view of the current run (page load, run switch)."""
    _follow_again(session, oauth_token, oauth_profile)
    return full_view(session)


def _follow_again(session: Session, oauth_token: gr.OAuthToken | None, oauth_profile: gr.OAuthProfile | None) -> None:
    """A run whose Hugging Face job trains on with nothing here following it (the app restarted) is followed again."""
    run = session.current()
    if run is not None and remote.reattach(run, jobs.MANAGER, hub_token(oauth_token), username(oauth_profile)):
        info("This run trains on Hugging Face Jobs: following its job again.")


def full_view(session: Session) -> tuple:
    return _render(session, force=True)


def _render(session: Session, *, force: bool) -> tuple:
    run = session.current()
    if run is None:
        return ("Add images on the Upload tab to begin.", None, [], "", None, "", gr.Timer(active=False), gr.skip(),
                gr.update(interactive=True), gr.update(interactive=False), gr.update(interactive=False))
    monitor = _monitor(session, run)
    monitor.update()
    status = run_status(monitor, jobs.MANAGER)
    console = run / jobs.CONSOLE_LOG
    where = remote.status_line(run)  # a Hugging Face job's stage changes without an event
    key = (run.name, monitor.offset, status, console.stat().st_size if console.exists() else 0, where)
    previous = session.cache.get("rendered")
    if not force and previous == key:
        return skip_all(len(_VIEW_FIELDS))
    session.cache["rendered"] = key
    state_changed = previous is None or previous[0] != key[0] or previous[2] != status
    has_progress = bool(monitor.checkpoints) or (run / "checkpoints").is_dir() or (run / "final").is_dir()
    return (
        status_markdown(monitor, status) + (f"\n\n{where}" if where else ""),
        loss_frame(monitor),
        gr.update(value=monitor.sample_items(), columns=max(1, len(next(iter(monitor.samples.values()), [None] * 3)))),
        memory_markdown(monitor),
        final_files(run),
        console_tail(run, 200) if console.exists() else "",
        gr.Timer(active=status.active),
        run_picker(session) if state_changed else gr.skip(),  # its label shows the state
        gr.update(interactive=not status.active and not has_progress),
        gr.update(interactive=status.active),
        gr.update(interactive=not status.active and status.state in ("stopped", "interrupted", "failed") and has_progress),
    )


_VIEW_FIELDS = ("status", "loss", "samples", "memory", "files", "console", "timer", "run", "start", "stop", "resume")


def status_markdown(monitor: RunMonitor, status: Status) -> str:
    icon = STATUS_ICONS.get(status.state, "")
    total = monitor.total_steps
    progress = f"step {monitor.step} / {total}" if total else f"step {monitor.step}"
    if status.state == "queued":
        return (f"{icon} **Waiting in line: number {status.queue_position}.** One training job runs at a time on this "
                "machine; yours starts by itself when the one ahead ends. You can close this page and come back.")
    if status.state == "running" and (monitor.started is None or monitor.terminal is not None):
        # no `started` event from this attempt yet (a resumed run still shows its last one)
        return f"{icon} **Starting**: loading the base model and preparing the images…"
    if status.state in ("running", "stopping"):
        last = monitor.last_step or {}
        parts = [progress]
        if last:
            parts += [f"ETA {format_duration(last.get('eta_seconds'))}", f"{last.get('sec_per_step', 0):.2f} s/step",
                      f"loss {last.get('loss', 0):.4f}"]
        verb = "Stopping (saving a checkpoint after this step)" if status.state == "stopping" else "Training"
        warnings = "".join(f"\n\n⚠️ {md_escape(w)}" for w in monitor.started.get("warnings") or [])  # settings, damage
        return f"{icon} **{verb}**: " + " · ".join(parts) + warnings
    if status.state == "finished":
        text = (f"{icon} **Finished: {progress}.** Download the files below, try the LoRA on the Generate tab, "
                "or publish it.")
        note = dora_note(monitor.run_dir)
        return text + (f"\n\n⚠️ {note}" if note else "")
    if status.state == "stopped":
        return f"{icon} **Stopped at {progress}.** A checkpoint is saved: press **Resume** to continue from it."
    if status.state == "interrupted":
        return (f"{icon} **Interrupted at {progress}** (the app restarted while it trained). "
                "Press **Resume** to continue from the last checkpoint.")
    if status.state == "failed":
        text = f"{icon} **Training failed** ({progress}).\n\n**Error:** {md_escape(status.error)}"
        if status.hint and "\n" in status.hint:  # a console tail: the trainer died without saying why
            return text + f"\n\n**Last lines of the console:**\n```\n{status.hint}\n```"
        return text + (f"\n\n**What to do:** {md_escape(status.hint)}" if status.hint else "")
    return "🟦 Ready. Press **Check** to see the plan, then **Start training**."


def loss_frame(monitor: RunMonitor):
    """The loss plot's data, or None before the first step.

    Never an empty frame: the plot fixes its axis types and series colours from the first data it
    gets, and an empty frame would leave it with category axes and invisible lines. Nor one with the
    validation loss alone (measured at step 0, before the first step's loss): the raw and smoothed
    lines would then never be drawn (seen on a Hugging Face Jobs run, whose events arrive in bursts).
    """
    if not monitor.losses:
        return None
    return series_frame(monitor.loss_rows(), "loss", "series")


def memory_markdown(monitor: RunMonitor) -> str:
    import psutil

    memory = (monitor.last_step or {}).get("memory") or {}
    machine = psutil.virtual_memory()
    parts = []
    if "rss_gb" in memory:
        parts.append(f"trainer RAM {memory['rss_gb']:.2f} GB")
    if "gpu_gb" in memory:
        parts.append(f"GPU peak {memory['gpu_gb']:.2f} GB")
    parts.append(f"machine RAM {machine.used / 2**30:.1f} / {machine.total / 2**30:.1f} GB")
    device = (monitor.started or {}).get("device")
    return "**Memory:** " + " · ".join(parts) + (f"  \n**Device:** {code(device)}" if device else "")


def final_files(run: Path) -> list[str] | None:
    final = run / "final"
    if not final.is_dir():
        return None
    return [servable(p) for p in sorted(final.iterdir()) if p.is_file() and not p.name.startswith(".")] or None
