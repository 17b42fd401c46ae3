"""LoRA Studio's engine: turn a folder of captioned images into a Stable Diffusion LoRA.

This package never imports gradio; the web app lives in lora_trainer/ui/.
"""

__version__ = "0.1.0"
