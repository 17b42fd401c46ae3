# LoRA Studio for a Hugging Face Docker Space or any GPU host.
#
#   docker build -t lora-studio .
#   docker run --gpus all -p 7860:7860 -v lora-studio-data:/data lora-studio
#
# torch from PyPI is the CUDA build on Linux x86_64 (the host needs the NVIDIA driver and the
# container toolkit); for a smaller CPU-only image:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t lora-studio .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""

# Spaces run the container as uid 1000; files it writes must belong to that user.
RUN useradd --create-home --uid 1000 user \
    && mkdir -p /data && chown user:user /data
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /home/user/app

# Dependencies first, so a code change does not reinstall torch.
COPY --chown=user requirements.txt .
RUN pip install --user ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} -r requirements.txt

COPY --chown=user app.py .
COPY --chown=user lora_trainer ./lora_trainer

# Runs, model caches and the built-in tiny models live under /data: mount a volume there (on a
# Space, enable persistent storage) to keep them across restarts.
ENV GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    LORA_STUDIO_WORKSPACE=/data/workspace \
    LORA_STUDIO_CACHE=/data/cache/lora-studio \
    HF_HOME=/data/cache/huggingface
EXPOSE 7860

CMD ["python", "app.py"]
