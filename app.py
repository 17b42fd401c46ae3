"""LoRA Studio: `python app.py` serves the web app (a Hugging Face Space runs this file).

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860); run
folders go to LORA_STUDIO_WORKSPACE (default ./workspace).
"""

from lora_trainer.ui import build_app, launch_options, queue

demo = queue(build_app())

if __name__ == "__main__":
    demo.launch(**launch_options())
