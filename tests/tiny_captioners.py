"""Tiny random-weight captioners built offline, saved like Hub models: BLIP, Florence-2, Qwen2.5-VL, Qwen3-VL.

The real transformers classes with shrunk configs; the tokenizers are written from a small vocabulary
(BLIP's WordPiece) or the 256 byte-level symbols (Florence-2's BART and Qwen's BPE, so any prompt
encodes). A random model says gibberish: these prove the code path, not the captions. Each generation
config asks for a few tokens at least, so a caption is never empty by chance.
"""

from __future__ import annotations

from pathlib import Path

import torch

BLIP_VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] a an the of in on with and cat dog woman man red blue sitting standing " \
             "table painting drawing photo tree house sky".split()
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def byte_level_vocab(specials: list[str]) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    return {token: i for i, token in enumerate(specials + sorted(ByteLevel.alphabet()))}


def build_tiny_blip(folder: Path):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BLIP_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    ids = {"bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
           "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    text = BlipTextConfig(vocab_size=len(BLIP_VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, **ids)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=32)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def build_tiny_florence2(folder: Path, image_size: int = 64):
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BartTokenizer(vocab=byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>"]), merges=[],
                              extra_special_tokens={"image_token": "<image>"})
    # the vision tower downsamples 32x and adds one temporal token: that many image tokens per picture
    images = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                   image_seq_length=(image_size // 32) ** 2 + 1)
    processor = Florence2Processor(images, tokenizer)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                      max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id)
    vision = Florence2VisionConfig(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 2),
                                   num_groups=(1, 2, 2, 2), window_size=2, projection_dim=32, drop_path_rate=0.0,
                                   max_position_embeddings=8)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=tokenizer.image_token_id)).eval()
    model.generation_config.min_new_tokens = 4
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def build_tiny_qwen_vl(folder: Path, version: str = "2.5"):
    """A tiny Qwen2.5-VL (version "2.5") or Qwen3-VL ("3"): tokenizer, image processor and model, no processor file.

    Like the real repositories' files, minus the video processor (which needs torchvision).
    """
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Qwen2Tokenizer(vocab=byte_level_vocab([]), merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIALS)
    ids = dict(zip(["pad", "start", "end", "vision_start", "vision_end", "image", "video"],
                   tokenizer.convert_tokens_to_ids(QWEN_SPECIALS), strict=True))
    patch = 14 if version == "2.5" else 16
    factor = patch * 2  # patch x spatial merge: one vision token per factor x factor pixels
    images = Qwen2VLImageProcessorPil(min_pixels=factor * factor * 4, max_pixels=factor * factor * 6, patch_size=patch,
                                      merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=ids["pad"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                  vision_end_token_id=ids["vision_end"])
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(text_config={**text, "bos_token_id": ids["pad"], "eos_token_id": ids["end"]},
                                  vision_config={**vision, "window_size": 28, "fullatt_block_indexes": [1]}, **tokens)
        model_class = Qwen2_5_VLForConditionalGeneration
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text["rope_parameters"]["mrope_interleaved"] = True
        config = Qwen3VLConfig(text_config={**text, "head_dim": 8},
                               vision_config={**vision, "num_position_embeddings": 16, "deepstack_visual_indexes": [1]},
                               **tokens)
        model_class = Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config.update(min_new_tokens=4, eos_token_id=ids["end"], pad_token_id=ids["pad"])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    images.save_pretrained(folder)
    return model, tokenizer, images
