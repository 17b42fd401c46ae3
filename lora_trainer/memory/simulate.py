"""Peak memory of a training step or a render, measured on the meta device: exact, instant, no GPU.

The real model (built from its config on the meta device, LoRA attached with peft) runs a
forward and backward pass on meta tensors: autograd builds the same graph and saves the same
tensors as on a GPU, but nothing is computed or allocated. A dispatch mode counts the bytes of
every tensor alive at each moment; its high-water mark is what `torch.cuda.max_memory_allocated`
would report, minus the weights (counted apart). Two things a GPU does differently are emulated:

- CUDA autocast (mixed precision): matmuls and convolutions run in half precision, norms,
  softmax and losses in fp32 (the op lists of PyTorch's autocast documentation), so the casts and
  the fp32 copies they create are counted too;
- fused attention: PyTorch's SDPA on a GPU (flash / memory-efficient kernels) keeps q, k, v, the
  output and a log-sum-exp per row, never the tokens x tokens attention matrix that the meta
  device's reference implementation would build.

Gradient checkpointing runs the real `torch.utils.checkpoint` (diffusers' own switch), whose
recomputation in the backward pass is counted like any other allocation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

# CUDA autocast's op lists (https://pytorch.org/docs/stable/amp.html#cuda-ops-that-can-autocast-to-float16
# and #cuda-ops-that-can-autocast-to-float32), the ones a UNet, a VAE or CLIP calls.
_LOWER = ("linear", "conv1d", "conv2d", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "einsum",
          "scaled_dot_product_attention")
_FP32 = ("group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "exp", "pow", "rsqrt")


TABLE = Path(__file__).with_name("simulations.json")  # shipped results (bench/memory_table.py writes it)
FRESH_ENV = "LORA_STUDIO_FRESH_SIMULATIONS"  # set (to anything): ignore the shipped table, simulate everything


def _versions() -> dict[str, Any]:
    """What a result depends on besides its arguments. torch's local tag (+cpu, +cu128) is dropped: the
    meta device runs the same code in every build, so a table made on a CPU serves a GPU host too."""
    import diffusers
    import peft
    import torch

    return {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__, "peft": peft.__version__,
            "simulation": _SIM_VERSION}


def cache_key(fn_name: str, args: tuple) -> str:
    v = _versions()
    return hashlib.sha256(json.dumps([fn_name, list(args), v["torch"], v["diffusers"], v["peft"],
                                      v["simulation"]]).encode()).hexdigest()[:32]


@functools.cache
def shipped() -> dict[str, int]:
    """The table shipped with the package: the simulations the presets' plans on common cards need, for
    SD 1.5 and SDXL, so `check` and the plan at train start need none of them. Empty when it was made
    with other library versions (every key would miss anyway)."""
    if os.environ.get(FRESH_ENV):
        return {}
    try:
        table = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}
    return table["results"] if table.get("versions") == _versions() else {}


def _disk_cached(fn):
    """Remember results in memory, in the table shipped with the package and in the model cache folder:
    a simulation takes seconds, its result never changes for the same inputs and library versions."""
    memo: dict[str, int] = {}

    @functools.wraps(fn)
    def wrapper(*args):
        key = cache_key(fn.__name__, args)
        if key in memo:
            return memo[key]
        if key in shipped():
            memo[key] = shipped()[key]
            return memo[key]
        from ..tiny import cache_root

        path = Path(cache_root()) / "memory-simulations.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        if key not in stored:
            stored[key] = fn(*args)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps({**_reread(path), key: stored[key]}))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache only costs the next run the simulation
        memo[key] = stored[key]
        return memo[key]

    return wrapper


def _reread(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_SIM_VERSION = 1  # bump when the simulation changes what it counts


def _modes():
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_map

    class LiveBytes(TorchDispatchMode):
        """The bytes of all tensors created while active and still alive; `peak` is the high-water mark."""

        def __init__(self):
            super().__init__()
            self.refs: dict[int, int] = {}
            self.now = self.peak = 0

        def _release(self, key: int, nbytes: int) -> None:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.now -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key, nbytes = storage._cdata, storage.nbytes()
                    if key not in self.refs:
                        if key in inputs:  # a view or an in-place result of a tensor made before (a weight)
                            continue
                        self.refs[key] = 0
                        self.now += nbytes
                        self.peak = max(self.peak, self.now)
                    self.refs[key] += 1
                    weakref.finalize(t, self._release, key, nbytes)
            return out

    class FusedAttention(torch.autograd.Function):
        """What flash / memory-efficient SDPA allocates and keeps: output and log-sum-exp, then grads."""

        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            workspace = q.new_empty(q.shape, dtype=torch.float32)  # the kernels accumulate dq in fp32
            del workspace
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    class Autocast(TorchFunctionMode):
        """CUDA autocast's casting policy, for meta tensors (which real autocast never sees)."""

        def __init__(self, dtype):
            super().__init__()
            self.dtype = dtype

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "scaled_dot_product_attention":
                q, k, v = (self._cast(t, self.dtype) for t in args[:3])
                return FusedAttention.apply(q, k, v)
            if self.dtype is not None and name in _LOWER:
                args, kwargs = tree_map(lambda t: self._cast(t, self.dtype), (args, kwargs))
            elif self.dtype is not None and name in _FP32:
                args, kwargs = tree_map(lambda t: self._cast(t, torch.float32), (args, kwargs))
            return func(*args, **kwargs)

        @staticmethod
        def _cast(t, dtype):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and dtype is not None and t.dtype != dtype:
                return t.to(dtype)
            return t

    return LiveBytes, Autocast


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _lora_model(component: str, config: dict, dtype: str, lora: dict | None):
    import torch

    from ..models import attach_lora, lora_config
    from .arch import meta_model

    # torch's own Module.to: diffusers' override warns on every dtype cast, even with no fp32-only modules.
    model = torch.nn.Module.to(meta_model(component, config), _dtype(dtype)).requires_grad_(False)
    if lora:
        with torch.device("meta"):
            attach_lora(model, lora_config(lora["rank"], lora["rank"], 0.0, lora["targets"], use_dora=lora.get("dora", False),
                                           use_rslora=False, layers=lora.get("layers")), component)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights stay fp32 (cast_training_params)
    return model


def _half(dtype: str):
    return None if dtype == "fp32" else _dtype(dtype)


def _run(forward, dtype: str, backward: bool = False) -> int:
    """Peak live bytes of `forward()` (under emulated autocast) and, if asked, of the backward of its result.

    The backward runs outside the autocast mode (a function mode is switched off inside its own handler,
    so `loss.backward()` inside it would run everything below unwatched); checkpointed blocks switch it
    back on for their recomputation, as torch.utils.checkpoint restores real autocast.
    """
    LiveBytes, Autocast = _modes()
    live = LiveBytes()
    with live:
        with Autocast(_half(dtype)):
            loss = forward()
        if backward:
            loss.backward()
        del loss
    return live.peak


def _checkpointing_with_autocast(dtype: str):
    """diffusers' checkpointing function (non-reentrant torch.utils.checkpoint), recomputing under autocast."""
    import torch

    _, Autocast = _modes()

    def checkpointed(module, *args):
        def run(*inputs):
            with Autocast(_half(dtype)):
                return module(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpointed


@_disk_cached
def _unet_step(config_json: str, lora_json: str, batch: int, height: int, width: int, dtype: str,
               checkpointing: bool) -> int:
    config, lora = json.loads(config_json), json.loads(lora_json)
    model = _lora_model("unet", config, dtype, lora)
    if checkpointing:
        model.enable_gradient_checkpointing(_checkpointing_with_autocast(dtype))
    model.train()
    wdt = _dtype(dtype)
    import torch

    def step():
        latents, timesteps, embeds, added = _unet_inputs(torch, config, batch, height, width, wdt)
        pred = model(latents, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), latents.float())

    return _run(step, dtype, backward=True)


def unet_training_peak(config: dict[str, Any], lora: dict[str, Any], batch: int, height: int, width: int, dtype: str,
                       checkpointing: bool) -> int:
    """Peak bytes above the frozen weights of one UNet training step (forward, loss, backward).

    `lora` = {"rank": r, "targets": [...], "dora": bool}; `dtype` = fp16 | bf16 | fp32 (fp32: no autocast).
    """
    return _unet_step(json.dumps(config, sort_keys=True), json.dumps(lora, sort_keys=True), batch, height, width,
                      dtype, checkpointing)


def _kept_by_text_forward(model, config: dict, batch: int, dtype: str) -> int:
    """Bytes alive after a text encoder's forward: what the graph holds until the UNet's backward reaches it."""
    import torch

    LiveBytes, Autocast = _modes()
    live = LiveBytes()
    ids = torch.zeros(batch, config.get("max_position_embeddings", 77), dtype=torch.long, device="meta")
    with live, Autocast(_half(dtype)):
        out = model(ids, output_hidden_states=True)
        kept = live.now
        del out
    return kept


@_disk_cached
def _text_step(component: str, config_json: str, lora_json: str, batch: int, dtype: str, checkpointing: bool) -> int:
    config, lora = json.loads(config_json), json.loads(lora_json)
    model = _lora_model(component, config, dtype, lora)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return _kept_by_text_forward(model, config, batch, dtype)


@_disk_cached
def _pivotal_text_step(component: str, config_json: str, vectors: int, batch: int, dtype: str) -> int:
    import torch

    from ..pivotal import LearnedTokens

    config = json.loads(config_json)
    model = _lora_model(component, config, dtype, None)
    frozen = model.get_input_embeddings()
    rows = torch.empty(vectors, frozen.weight.shape[1], device="meta")
    model.set_input_embeddings(LearnedTokens(frozen, frozen.num_embeddings, rows))  # the trainer's module (pivotal.py)
    return _kept_by_text_forward(model, config, batch, dtype)


def text_encoder_training_bytes(component: str, config: dict[str, Any], lora: dict[str, Any], batch: int, dtype: str,
                                checkpointing: bool) -> int:
    """Bytes a trained text encoder's forward keeps alive for the backward pass (batch of captions)."""
    return _text_step(component, json.dumps(config, sort_keys=True), json.dumps(lora, sort_keys=True), batch, dtype,
                      checkpointing)


def pivotal_text_encoder_bytes(component: str, config: dict[str, Any], vectors: int, batch: int, dtype: str) -> int:
    """Bytes a frozen text encoder's forward keeps alive when only the trigger's new embedding rows train
    (pivotal tuning): their gradient flows back through every layer, so each layer keeps what its input's
    gradient needs (norm inputs and statistics, attention's q, k, v and output, the MLP's pre-activation),
    though no weight of it trains. The trainer runs these encoders without gradient checkpointing."""
    return _pivotal_text_step(component, json.dumps(config, sort_keys=True), vectors, batch, dtype)


def _unet_inputs(torch, config: dict, batch: int, height: int, width: int, dtype) -> tuple:
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.empty(batch, config.get("in_channels", 4), height // 8, width // 8, **meta)
    embeds = torch.empty(batch, 77, config["cross_attention_dim"], **meta)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.empty(batch, pooled, **meta), "time_ids": torch.empty(batch, 6, **meta)}
    return latents, torch.zeros(batch, dtype=torch.long, device="meta"), embeds, added


@_disk_cached
def _inference(component: str, config_json: str, batch: int, height: int, width: int, dtype: str, what: str,
               tiling: bool) -> int:
    import torch

    config = json.loads(config_json)
    model = _lora_model(component, config, dtype, None)
    if tiling:
        model.enable_tiling()
    wdt = _dtype(dtype)

    def run():
        with torch.no_grad():
            if what == "decode":
                model.decode(torch.empty(batch, config["latent_channels"], height // 8, width // 8, device="meta", dtype=wdt))
            elif what == "encode":
                model.encode(torch.empty(batch, config["in_channels"], height, width, device="meta", dtype=wdt))
            else:
                latents, timesteps, embeds, added = _unet_inputs(torch, config, batch, height, width, wdt)
                model(latents, timesteps, embeds, added_cond_kwargs=added)

    return _run(run, dtype)


def inference_peak(component: str, config: dict[str, Any], batch: int, height: int, width: int, dtype: str,
                   what: str = "denoise", *, tiling: bool = False) -> int:
    """Peak bytes above the weights of one no-grad pass: 'denoise' (UNet), 'decode' or 'encode' (VAE)."""
    return _inference(component, json.dumps(config, sort_keys=True), batch, height, width, dtype, what, tiling)
