"""Publish: push the current run (both LoRA files, samples, config, a model card) to the Hugging Face Hub.

Which LoRA: the checkpoint the evaluation recommends (best/, the default when there is one) or the last
step (final/); the model card says which and why.

The token (typed, or the visitor's own from "Sign in with Hugging Face" on a Space) is handed to
hub.push_run for this push only: never written to disk, a log or the run folder, never sent back
to the page. On a shared Space the Space's own HF_TOKEN is never used for a visitor's push.
"""

from __future__ import annotations

import json

import gradio as gr

from .. import system
from ..common import Shared, code, dora_note, md_escape, user_errors
from ..workspace import Session


def build(shared: Shared) -> None:
    with gr.Tab("5 · Publish", id="publish") as tab:
        gr.Markdown("Publish the current run's LoRA to the Hugging Face Hub: both files, the sample images, the "
                    "settings and a model card with the loss curve.")
        if system.oauth_available():
            gr.LoginButton("Sign in with Hugging Face")
        with gr.Row(equal_height=True):
            repo = gr.Textbox(label="Repository", placeholder="my-lora  or  your-name/my-lora", scale=3,
                              info="A bare name goes to your account.", elem_id="publish-repo")
            private = gr.Checkbox(True, label="Private repository", scale=1)
        which = gr.Radio([("The last step (final/)", "final")], value="final", label="Which LoRA",
                         info="The evaluation's pick (best/) is the default once the run has been evaluated.",
                         elem_id="publish-checkpoint")
        token = gr.Textbox(
            label="Hugging Face token", type="password", visible=not system.oauth_available(),
            placeholder="hf_...", info=token_help(), elem_id="publish-token",
        )
        push = gr.Button("Publish to the Hub", variant="primary", elem_id="publish-button")
        result = gr.Markdown(elem_id="publish-result")
    push.click(publish, [shared.session, repo, private, token, which], [result], api_name="publish")
    shared.on_run_change(suggest_repo, [shared.session, repo], [repo])
    shared.on_run_change(checkpoint_choices, [shared.session], [which])
    # An evaluation on the Train tab makes best/ without a run change: look again when the tab opens.
    tab.select(checkpoint_choices, [shared.session], [which], api_name="publish_checkpoints")


def token_help() -> str:
    if system.space_id():
        return "A token with 'Write' access (huggingface.co/settings/tokens). Used for this push only, never stored."
    return ("A token with 'Write' access (huggingface.co/settings/tokens). Used for this push only, never stored. "
            "Leave empty to use this machine's HF_TOKEN or `hf auth login`.")


def suggest_repo(session: Session, current: str) -> str:
    if current:
        return gr.skip()
    run = session.current()
    info = run / "final" / "lora_info.json" if run else None
    if info is None or not info.exists():
        return gr.skip()
    try:
        return json.loads(info.read_text()).get("name") or gr.skip()
    except (OSError, ValueError):
        return gr.skip()


def checkpoint_choices(session: Session):
    """The run's publishable LoRAs, labelled with their step (and, for best/, the evaluation's reason)."""
    from ...hub.modelcard import BEST, PICK_FILE, default_checkpoint, publishable_checkpoints

    run = session.current()
    names = publishable_checkpoints(run) if run else []
    if not names:
        return gr.update(choices=[("The last step (final/): train to the end first", "final")], value="final")
    choices = []
    for name in names:
        step = _info(run / name / "lora_info.json").get("steps")
        if name == BEST:
            choices.append((f"Recommended by the evaluation: step {step} (best/)", name))
        else:
            choices.append((f"The last step: step {step} (final/)", name))
    pick = _info(run / BEST / PICK_FILE) if BEST in names else {}
    note = (f"Recommended because: {pick['reason']}." if pick.get("reason")
            else "Evaluate the run (Train tab) to get a recommended checkpoint.")
    return gr.update(choices=choices, value=default_checkpoint(run), info=note)


def _info(path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@user_errors
def publish(session: Session, repo_id: str, private: bool, token: str, checkpoint: str | None = None,
            oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()) -> str:
    from ... import hub

    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise gr.Error("Type a repository name, e.g. my-lora.")
    run = session.current()
    if run is None:
        raise gr.Error(session.no_run("No run yet: upload images and train first."))
    chosen = (oauth_token.token if oauth_token else None) or (token or "").strip() or None
    if chosen is None and system.space_id():
        raise gr.Error("Sign in with Hugging Face (or paste a token with write access) to publish from this Space.")

    def step(message: str) -> None:
        progress(None, desc=message)

    from ...hub.modelcard import BEST, default_checkpoint

    checkpoint = checkpoint or default_checkpoint(run)
    result = hub.push_run(run, repo_id, token=chosen, private=bool(private), endpoint=system.hub_endpoint(),
                          progress=step, checkpoint=checkpoint)
    files = ", ".join(code(f) for f in result.files[:12]) + (" …" if len(result.files) > 12 else "")
    note = dora_note(run)
    what = "the recommended checkpoint (best/)" if checkpoint == BEST else "the last step (final/)"
    return (f"✅ **Published** {what}: [{md_escape(result.url)}]({result.url})  \n{len(result.files)} files: {files}"
            + (f"\n\n⚠️ {note}" if note else ""))
