"""Pivotal tuning: the trigger word gets its own learned embedding, trained together with the LoRA.

The trigger becomes new tokens in every tokenizer (`ohwx`, and `ohwx_1`, ... for more vectors: the names
diffusers' textual-inversion loader gives a multi-vector embedding, so its prompt conversion applies), and
each text encoder's token embedding is wrapped so only those new rows train (a few hundred numbers, not the
vocabulary's tens of millions, and no optimizer state for the rest). The result is saved as an ordinary
textual-inversion file beside the LoRA, in the layout every loader reads:

- SD 1.x: ``{"emb_params": (vectors, 768)}`` (diffusers' `load_textual_inversion`, A1111, ComfyUI);
- SDXL: ``{"clip_l": (vectors, 768), "clip_g": (vectors, 1280)}`` (A1111, ComfyUI; diffusers loads each key
  into its text encoder);

and bundled into the kohya LoRA file as ``bundle_emb.<trigger>.*`` keys, as A1111 reads bundled embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .formats import embeddings_file, embeddings_filename  # noqa: F401 - the files' names live with the other formats

EMBEDDING_KEYS = {"sd": ("emb_params",), "sdxl": ("clip_l", "clip_g")}  # one per text encoder, in order


def token_names(trigger: str, vectors: int) -> list[str]:
    return [trigger] + [f"{trigger}_{i}" for i in range(1, vectors)]


class LearnedTokens(torch.nn.Module):
    """A token embedding with trainable rows for the ids from `first_id` on; the original rows stay frozen."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = torch.nn.Parameter(init.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads of an input embedding (dtype, device, size)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.first_id - 1))
        new = ids >= self.first_id
        picked = self.vectors[(ids - self.first_id).clamp(0, len(self.vectors) - 1)].to(out.dtype)
        return torch.where(new[..., None], picked, out)  # no host sync: the same work whether or not a row is new


@dataclass
class Pivotal:
    """The trigger's learned embeddings, one LearnedTokens per text encoder."""

    kind: str
    trigger: str
    tokens: list[str]
    modules: list[LearnedTokens]
    tokenizer: Any  # the first tokenizer: every tokenizer has the same new tokens

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [m.vectors for m in self.modules]

    def expand(self, captions: list[str]) -> list[str]:
        """Captions with a multi-vector trigger written out as its tokens, the way diffusers' pipelines convert
        prompts (TextualInversionLoaderMixin.maybe_convert_prompt), so training reads what inference will."""
        if len(self.tokens) == 1:
            return captions
        spelled = " ".join(self.tokens)
        return [c.replace(self.trigger, spelled) if self.trigger in self.tokenizer.tokenize(c) else c for c in captions]

    def state(self) -> dict[str, torch.Tensor]:
        """The textual-inversion file's tensors."""
        return {k: m.vectors.detach().float().cpu().contiguous() for k, m in zip(EMBEDDING_KEYS[self.kind], self.modules, strict=True)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, module in zip(EMBEDDING_KEYS[self.kind], self.modules, strict=True):
                module.vectors.copy_(state[key].to(module.vectors.device))

    def sync_gradients(self, accelerator) -> None:
        """Average the embeddings' gradients over processes (the text encoders are not DDP-wrapped)."""
        if accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")


def install(cfg, kind: str, tokenizers: list, text_encoders: list, device) -> Pivotal | None:
    """Add the trigger's tokens to every tokenizer and a trainable embedding of them to every text encoder."""
    vectors = cfg.lora.trigger_vectors
    if not vectors:
        return None
    trigger = cfg.data.trigger.strip()
    tokens = token_names(trigger, vectors)
    generator = torch.Generator().manual_seed(cfg.optim.seed)
    modules = []
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        if any(t in tokenizer.added_tokens_encoder for t in tokens) or tokenizer.add_tokens(tokens) != vectors:
            raise ConfigError(
                f"data.trigger = {trigger!r} is already a special token of this base's tokenizer, so pivotal tuning "
                "cannot give it a new embedding; use a new word as the trigger (e.g. 'ohwx') or set lora.trigger_vectors = 0")
        ids = tokenizer.convert_tokens_to_ids(tokens)
        base = encoder.get_input_embeddings()
        init = initial_vectors(base.weight, tokenizer, cfg.lora.embedding_init, vectors, generator)
        module = LearnedTokens(base, ids[0], init).to(device)
        encoder.set_input_embeddings(module)
        modules.append(module)
    return Pivotal(kind, trigger, tokens, modules, tokenizers[0])


def initial_vectors(weight: torch.Tensor, tokenizer, word: str, vectors: int, generator: torch.Generator) -> torch.Tensor:
    """The starting embedding: the initializer word's (the mean of its tokens), else random at the scale of
    the vocabulary's embeddings (as diffusers' advanced DreamBooth script starts new tokens)."""
    weight = weight.detach().float().cpu()
    if word.strip():
        ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"lora.embedding_init = {word!r} has no tokens; use a word such as 'painting', or leave it empty")
        return weight[ids].mean(0, keepdim=True).repeat(vectors, 1)
    return torch.randn(vectors, weight.shape[1], generator=generator) * weight.std()


# -- files ------------------------------------------------------------------------------------------------
def kohya_bundle(kind: str, trigger: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding as kohya-format LoRA files bundle it (A1111's `bundle_emb.<name>.*` keys)."""
    if kind == "sd":
        return {f"bundle_emb.{trigger}.string_to_param.*": state["emb_params"]}
    return {f"bundle_emb.{trigger}.{key}": value for key, value in state.items()}


def without_bundle(path: Path) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors of a kohya file that bundles embeddings (diffusers' LoRA loader refuses the
    `bundle_emb.*` keys); None when it bundles none (load the file as it is)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        if not any(k.startswith("bundle_emb.") for k in f.keys()):
            return None
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}


def embeddings_for(lora_file: Path) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(trigger, textual-inversion tensors) that go with a LoRA file: the `*_emb.safetensors` saved beside
    it, else an embedding bundled in the file itself (A1111's layout; the first one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .formats import read_safetensors_metadata

    beside = embeddings_file(Path(lora_file).parent)
    if beside is not None:
        trigger = read_safetensors_metadata(beside).get("trigger", "")
        return (trigger, load_file(str(beside))) if trigger else None
    with safe_open(str(lora_file), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith("bundle_emb.")]
        if not keys:
            return None
        trigger = keys[0].split(".")[1]
        own = {k.split(".", 2)[2]: f.get_tensor(k) for k in keys if k.split(".")[1] == trigger}
    if "string_to_param.*" in own:
        return trigger, {"emb_params": own["string_to_param.*"]}
    return (trigger, own) if {"clip_l", "clip_g"} <= set(own) else None


def _pipeline_encoders(pipe) -> tuple[list, list]:
    encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    tokenizers = [tok for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tok is not None]
    return tokenizers, encoders


def load_into_pipeline(pipe, state: dict[str, torch.Tensor], trigger: str) -> list[str]:
    """Load an embedding (`embeddings_for`) into a diffusers pipeline through diffusers' own loader; returns
    the tokens."""
    tokenizers, encoders = _pipeline_encoders(pipe)
    kind = "sdxl" if len(encoders) == 2 else "sd"
    unload_from_pipeline(pipe, trigger)
    for key, tokenizer, encoder in zip(EMBEDDING_KEYS[kind], tokenizers, encoders, strict=True):
        pipe.load_textual_inversion(state[key], token=trigger, tokenizer=tokenizer, text_encoder=encoder)
    return token_names(trigger, len(state[EMBEDDING_KEYS[kind][0]]))


def unload_from_pipeline(pipe, trigger: str) -> None:
    """Remove the trigger's tokens (and their embedding rows) where a load added them."""
    tokenizers, encoders = _pipeline_encoders(pipe)
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        tokens = [t for t in tokenizer.added_tokens_encoder if t == trigger or re.fullmatch(rf"{re.escape(trigger)}_\d+", t)]
        if tokens:
            pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)
