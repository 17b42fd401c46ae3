"""LoRA Studio's web app (gradio). `build_app()` returns the Blocks; `launch_options()` how to serve it.

Import cost matters: this package imports gradio and the light engine modules only. torch,
diffusers and transformers load when a model is first needed (training runs in a subprocess).
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from . import system
from .header import build_header, wire_header
from .tabs import captions, generate, publish, rate, train, upload

CSS = """
.notice { background: var(--color-accent-soft); border-radius: 8px; padding: 4px 12px; }
.caption-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; gap: 4px !important;
                max-width: calc(25% - 12px); }  /* a short last page keeps the grid's card size */
.caption-card textarea { font-size: 0.9em; }
.caption-name input, .caption-name textarea { font-size: 0.8em; padding: 2px 6px !important; background: transparent !important;
                                               border: none !important; box-shadow: none !important; }
.caption-note, .caption-note p { font-size: 0.82em !important; color: var(--body-text-color-subdued); margin: 0; }
.train-status p { font-size: 1.05em; }
/* small images (thumbnails, the tiny model's 64 px) fill their frame instead of sitting in a corner of it */
#gen-off img, #gen-on img, #rate-left img, #rate-right img, .caption-thumb img { width: 100%; height: 100%; object-fit: contain; }
.report ul { margin-top: 0; }
.pager { align-items: center; }
.pager button { align-self: center; }
footer { display: none !important; }
"""

# A restarted server has none of this page's server-side state (its session, hence its runs): every click would act
# on an empty session while the page still shows the old one. gradio answers /gradio_api/app_id with an id that is
# new at each start; when it changes, reload, and the page load takes the session back (header.restore_session).
RESTART_WATCH_JS = """
() => {
  const root = (window.gradio_config && window.gradio_config.root) || window.location.origin;
  let known = window.gradio_config && window.gradio_config.app_id;
  setInterval(async () => {
    try {
      const answer = await fetch(root.replace(/\\/$/, "") + "/gradio_api/app_id", {cache: "no-store"});
      if (!answer.ok) return;
      const id = (await answer.json()).app_id;
      if (known === undefined || known === null) known = id;
      else if (id !== known) window.location.reload();
    } catch (e) { /* the server is down: try again */ }
  }, 3000);
}
"""


def build_app() -> gr.Blocks:
    ask_sign_in_for_scopes()
    with gr.Blocks(title="LoRA Studio", delete_cache=(3600, 6 * 3600)) as demo:
        shared = build_header()
        with gr.Tabs():
            upload.build(shared)
            captions.build(shared)
            train.build(shared)
            generate.build(shared)
            publish.build(shared)
            rate.build(shared)
        gr.Markdown("Your runs stay on this server and only this browser can see them; reloading the page keeps them.",
                    elem_classes=["caption-note"])
        wire_header(demo, shared)
        shared.finish()
    return demo


def ask_sign_in_for_scopes() -> None:
    """Sign-in asks for `jobs` only where the Train tab offers Jobs (system.sign_in_scopes). gradio reads
    OAUTH_SCOPES once, when it is imported, and uses it when launch() adds the sign-in routes: set it before."""
    import gradio.oauth

    scopes = system.sign_in_scopes()
    if scopes is not None:
        gradio.oauth.OAUTH_SCOPES = scopes


def launch_options(**overrides: Any) -> dict[str, Any]:
    """Blocks.launch() arguments: host and port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, no extra file access."""
    options: dict[str, Any] = {
        "server_name": os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        "max_file_size": os.environ.get("LORA_STUDIO_MAX_UPLOAD", "2gb"),
        "css": CSS,
        "js": RESTART_WATCH_JS,
        "theme": gr.themes.Soft(primary_hue="orange", secondary_hue="slate"),
        "ssr_mode": False,  # no Node server: one process, faster start
        "footer_links": ["api"],
        # gradio's run history keeps every call's inputs in the browser's localStorage: captions, and the
        # Hub token typed on the Publish tab. Off.
        "run_history": False,
        # No allowed_paths: the workspace is never served as-is. Handlers return copies gradio puts in its
        # cache under content-hash names, so one session cannot fetch another's files by path.
    }
    options.update(overrides)
    return options


def queue(demo: gr.Blocks) -> gr.Blocks:
    """Generation and captioning hold a model: a few at a time; polling is cheap and unlimited."""
    return demo.queue(default_concurrency_limit=2, max_size=64)


__all__ = ["build_app", "launch_options", "queue"]
