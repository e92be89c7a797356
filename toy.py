"""Tiny Qwen2.5-VL models built locally, with no download.

The tests, `bench.py` and the toy task (`--data toy`, `--model toy`) need a real Qwen2.5-VL: the same model class,
processor class, chat template and special tokens as `Qwen/Qwen2.5-VL-3B-Instruct`, so that every code path they
exercise is the one that trains the real model. Only the sizes differ. `build_model_folder` writes such a model as a
plain HF folder, which then loads through the same `from_pretrained` calls as a Hub checkpoint.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

# Qwen2.5-VL's special tokens, in Qwen's order (their ids are set in the model config below).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2.5-VL chat template, reduced to what this project sends: text and image content, a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the byte-level BPE learns its merges from: the words of prompts and answers, so that sequences stay short.
BPE_CORPUS = (
    "<think> </think> <answer> </answer> You are a helpful assistant. Solve the problem in the image. "
    "First think step by step inside <think> </think>, then give the final answer inside <answer> </answer>. "
    "Find x. Find the area of the triangle. How many sides does the shape have? What colour is the shape? "
    "The shape is a red green blue yellow circle triangle square pentagon hexagon with 3 4 5 6 sides. "
    "\\frac { \\sqrt { 2 } } { 5 } 2 \\sqrt { 221 } 0 1 2 3 4 5 6 7 8 9 10 A B C D degrees"
)


def build_processor(vocab_size: int = 512, min_pixels: int = 28 * 28, max_pixels: int = 112 * 112):
    """A Qwen2.5-VL processor with a small byte-level BPE tokenizer (any text encodes; ~`vocab_size` tokens)."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator([BPE_CORPUS] * 4, trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer, **overrides) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the real architecture at toy size (2+2 layers, ~0.3M parameters by default)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    text.update({k: v for k, v in overrides.items() if k != "vision_config"})
    vision.update(overrides.get("vision_config", {}))
    vision["out_hidden_size"] = text["hidden_size"]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)


def build_model_folder(path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny Qwen2.5-VL (model + processor) to `path`, deterministically from `seed`."""
    random.seed(seed)
    torch.manual_seed(seed)
    processor = build_processor()
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(processor.tokenizer, **config_overrides))
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
