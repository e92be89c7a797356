"""Tiny Qwen2.5-VL models built locally, with no download, and the toy task that one of them learns on a CPU.

The tests, `bench.py` and the toy task (`--data toy`, `--model toy`) need a real Qwen2.5-VL: the same model class,
processor class, chat template and special tokens as `Qwen/Qwen2.5-VL-3B-Instruct`, so that every code path they
exercise is the one that trains the real model. Only the sizes differ. `build_model_folder` writes such a model as a
plain HF folder, which then loads through the same `from_pretrained` calls as a Hub checkpoint.

The toy task (`toy_dataset`) asks for the colour of a drawn shape; its starting model (`starting_model`) is such a
tiny model, warm-started to write the answer format. `python apo.py --data toy` trains it in minutes (README).
"""

import json
import math
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


# ---------------------------------------------------------------------------------------------------- the toy task
# Each image holds one regular polygon (3 to 6 sides) in one of four colours, at a random place, size and angle, on a
# random light background; the question is the same for every image, so only the image holds the answer:
#   "What colour is the shape? A. red B. green C. blue D. yellow"  ->  "A" .. "D"
# The gold is a letter, which reward.parse_gold reads (a word like "red" would not parse). The image is 168 px wide:
# 36 image tokens, enough of the prompt for a random-weight model to pick the colour up within minutes of RL. (Asking
# for the number of sides instead is beyond this model in that time: even supervised, it stays at chance.)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
QUESTION = "<image>What colour is the shape? " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", COLOURS))
IMAGE_SIZE = 168
SPLIT_SIZES = {"train": 2000, "test": 200}


def draw_shape(sides: int, colour: str, rng: random.Random, dark: bool = False):
    """A regular polygon of `sides` sides in `colour`, placed, sized and turned at random: a PIL RGB image, on a
    random light background (`dark`: the graded toy's hard items, a dim small shape on a dark background)."""
    import math
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(20, 60) if dark else rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    radius = rng.uniform(0.25, 0.43) * IMAGE_SIZE * (0.5 if dark else 1)
    cx, cy = (rng.uniform(radius, IMAGE_SIZE - radius) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    corners = [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
                cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]
    fill = tuple(round(c + 0.4 * (b - c)) for c, b in zip(COLOURS[colour], background)) if dark else COLOURS[colour]
    ImageDraw.Draw(image).polygon(corners, fill=fill)
    return image


def toy_rows(split: str, seed: int) -> list:
    """The rows of a split as dicts {'images': [PIL], 'problem', 'answer'}; deterministic in (split, seed).

    Both splits come from one random stream: the first SPLIT_SIZES['train'] drawings are the train split, the next
    ones the test split, so the two never share an image."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"the toy data has splits {sorted(SPLIT_SIZES)}, not {split!r}")
    rng = random.Random(f"toy-{seed}")
    rows = []
    for i in range(SPLIT_SIZES["train"] + SPLIT_SIZES["test"]):
        sides, colour = rng.randint(3, 6), rng.choice(list(COLOURS))
        image = draw_shape(sides, colour, rng)  # always drawn, so that the stream (and the test split) stays put
        if (i < SPLIT_SIZES["train"]) == (split == "train"):
            rows.append({"images": [image], "problem": QUESTION, "answer": "ABCD"[list(COLOURS).index(colour)]})
    return rows


def toy_dataset(split: str, seed: int = 0, task: str = "toy"):
    """A toy task ('toy' or 'toy-graded') as a `datasets.Dataset` with the geo3k columns: images (a list of one
    image), problem, answer; the graded one also has `level` (easy, hard, old)."""
    import datasets

    columns = {"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
               "answer": datasets.Value("string")}
    if task == "toy":
        return datasets.Dataset.from_list(toy_rows(split, seed), features=datasets.Features(columns))
    rows = [{k: r[k] for k in ("images", "problem", "answer", "level")} for r in graded_rows(split, seed)]
    return datasets.Dataset.from_list(rows, features=datasets.Features({**columns, "level": datasets.Value("string")}))


# ------------------------------------------------------------------------------------- the graded toy task
# `--data toy-graded`: the toy made so that each of APO's terms has something to act on (docs/EXPERIMENT.md). Each
# precondition, and what in this task makes it hold:
# - graded difficulty: "easy" items are the toy's shapes, which the starting model gets right ~2 times in 5;
#   "hard" ones are small, dim red, green or blue shapes on a dark background, which it gets right ~1 time in 5
#   and whose colour is harder to read, so groups with 1-3 of 8 right stay common while RL works on them;
# - a wrong prior where it is hard: on a dark background the starting model answers DECOY ("D. yellow", never
#   right there) 3 times in 5, so the KL toward it (the reference) pulls a policy that learns the right answer back,
#   and DADS, which weakens that pull for the rare right answers of hard groups, has work to do;
# - reasoning of varying length: the thought is THOUGHT and then 0 to 4 CHECK lines (7 tokens each) under a cap of
#   52 new tokens, and the starting model writes more of them before a wrong answer than before a right one, so
#   wrong answers run longer than right ones and STCR has a Δ to act on;
# - an old skill that RL does not train: "old" questions ask the colour of a thing (OLD_FACTS), which the image does
#   not show and the starting model answers right 9 times in 10; they are in the test split only, and eval.jsonl
#   reports their accuracy apart (--eval-breakdown level): the knowledge-preservation probe.
DECOY = "yellow"  # the hard items' wrong prior: no hard shape is yellow
OLD_FACTS = {"the sky": "blue", "grass": "green", "a banana": "yellow", "a strawberry": "red"}
CHECK = " Check the shape."
GRADED_SIZES = {"train": 2000, "test": 240}  # test: 100 easy, 100 hard, 40 old
GRADED_TARGETS = {  # the starting model's answers (its warm start's targets): P(right), P(decoy); checks before each
    "easy": dict(right=0.5, decoy=0.0, checks_right=(0, 2), checks_wrong=(1, 4)),
    "hard": dict(right=0.2, decoy=0.6, checks_right=(0, 2), checks_wrong=(1, 4)),
    "old": dict(right=0.9, decoy=0.0, checks_right=(0, 1), checks_wrong=(0, 1)),
}


def graded_item(level: str, rng: random.Random) -> dict:
    """One row of the graded toy: {'images', 'problem', 'answer', 'level', 'colour'}."""
    colour = rng.choice([c for c in COLOURS if level != "hard" or c != DECOY])
    if level == "old":  # a question about a thing, beside an unrelated shape
        thing = rng.choice(list(OLD_FACTS))
        image = draw_shape(rng.randint(3, 6), rng.choice(list(COLOURS)), rng)
        colour = OLD_FACTS[thing]
        problem = f"<image>What colour is {thing}? " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", COLOURS))
    else:
        image = draw_shape(rng.randint(3, 6), colour, rng, dark=level == "hard")
        problem = QUESTION
    return {"images": [image], "problem": problem, "answer": "ABCD"[list(COLOURS).index(colour)], "level": level,
            "colour": colour}


def graded_rows(split: str, seed: int = 0) -> list:
    """The rows of a split of the graded toy, deterministic in (split, seed): train half easy, half hard; test 100
    easy, 100 hard and 40 old, drawn from a stream of their own (the two splits share no image)."""
    if split not in GRADED_SIZES:
        raise ValueError(f"the graded toy has splits {sorted(GRADED_SIZES)}, not {split!r}")
    rng = random.Random(f"toy-graded-{split}-{seed}")
    levels = (["easy", "hard"] * (GRADED_SIZES["train"] // 2) if split == "train"
              else ["easy"] * 100 + ["hard"] * 100 + ["old"] * 40)
    return [graded_item(level, rng) for level in levels]


# -------------------------------------------------------------------------------------------- the starting model
# A random-weight model never writes <think>…</think> <answer>…</answer>, so RL would have no reward to work with.
# An instruct model starts RL knowing the format but not the answers; the toy's starting model is made the same way:
# a short supervised warm start on responses in the format whose letter is drawn at random, independent of the
# image. It learns the format and that the answer is a letter, not which one is right: its accuracy is chance, ~1/4.
# Its size: the default tiny_config with 4 text layers instead of 2 (with 2, even supervised training with the right
# answers does not learn to read the colour within minutes). Its thought is always the same sentence: with a few
# thoughts to choose from, RL spent 200 steps on which thought to write and none on the colour.
THOUGHT = "Find the shape in the image."
# The warm starts, per task: the graded toy's has more to learn (the colours, pale ones, the decoys, the facts).
WARM_START = {"toy": dict(seed=0, steps=200, batch_size=16, lr=3e-3, model={"num_hidden_layers": 4}),
              "toy-graded": dict(seed=0, steps=1000, batch_size=24, lr=3e-3, model={"num_hidden_layers": 4})}
CACHE = Path(__file__).resolve().parents[1] / ".toy_cache"               # git-ignored


def warm_start_target(row: dict, rng: random.Random, task: str = "toy") -> str:
    """A response in the format. The toy's: a random letter (the format, not the answer). The graded toy's: drawn
    from GRADED_TARGETS for the row's level (the right letter, the decoy or another), after THOUGHT and as many CHECK
    lines as GRADED_TARGETS gives a right or a wrong answer."""
    if task == "toy":
        return f"<think> {THOUGHT} </think> <answer> {rng.choice('ABCD')} </answer>"
    targets, right_colour = GRADED_TARGETS[row["level"]], row["colour"]
    u = rng.random()
    if u < targets["right"]:
        colour = right_colour
    elif u < targets["right"] + targets["decoy"]:
        colour = DECOY
    else:
        colour = rng.choice([c for c in COLOURS if c != right_colour and (not targets["decoy"] or c != DECOY)])
    checks = rng.randint(*targets["checks_right" if colour == right_colour else "checks_wrong"])
    return f"<think> {THOUGHT}{CHECK * checks} </think> <answer> {'ABCD'[list(COLOURS).index(colour)]} </answer>"


def warm_start(model, processor, steps: int, batch_size: int, lr: float, seed: int, task: str = "toy"):
    """Supervised fine-tuning on `warm_start_target`s: mean −log π(target token) over the target tokens."""
    import rollout

    rng = random.Random(seed)
    # drawings of their own, not the task's train or test images
    rows = toy_rows("train", seed=-1 - seed) if task == "toy" else [
        graded_item(level, rng) for level in ["easy", "hard", "old"] * 700]
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    # the graded toy's longer warm start ends on a cosine to lr/10, so that it settles on its targets' odds
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 if task == "toy" else
                                                 0.1 + 0.45 * (1 + math.cos(math.pi * k / steps)))
    model.train()
    for _ in range(steps):
        picked = rng.sample(rows, batch_size)
        prompts = rollout.encode_prompts(processor, [r["images"][0] for r in picked], [r["problem"] for r in picked],
                                         28 * 28, IMAGE_SIZE ** 2)
        targets = [tok(warm_start_target(r, rng, task))["input_ids"] + [eos] for r in picked]
        width = max(map(len, targets))
        target_ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in targets])   # [n, T]
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in targets])            # [n, T]
        batch = dict(prompts, input_ids=torch.cat([prompts["input_ids"], target_ids], 1),
                     attention_mask=torch.cat([prompts["attention_mask"], mask], 1),
                     mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(mask)], 1),
                     prompt_len=prompts["input_ids"].shape[1], response_mask=mask)
        logp, _ = rollout.response_logprobs(model, batch, temperature=1.0, share_prompt=False)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def starting_model(task: str = "toy") -> Path:
    """The starting model of a toy task (`--model toy`, `--model toy-graded`): built on first use (20-40 s; the
    graded one's about 2 min), then read from `.toy_cache/`.

    The folder name holds a hash of this file, so a changed recipe builds a new model. The build happens in a
    temporary folder renamed into place when complete: a killed build leaves nothing half-written, and of two
    processes building at once, the second to finish finds the folder there and drops its own copy. Nothing is
    ever deleted from the cache but a build's own temporary folder, so concurrent builds never collide."""
    import hashlib
    import os
    import shutil
    import tempfile

    name = "starting-model" if task == "toy" else f"{task}-starting-model"
    final = CACHE / f"{name}-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]}"
    recipe = WARM_START[task]
    if (final / "config.json").exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
    # The build seeds and draws from the global random generators and sets torch's thread count (one thread: at
    # this size threads only add overhead): all three are put back, so that a run is the same with or without a
    # cached model.
    python_state, threads = random.getstate(), torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.set_num_threads(1)
            build_model_folder(tmp, recipe["seed"], **recipe["model"])
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
            warm_start(model, build_processor(), recipe["steps"], recipe["batch_size"], recipe["lr"],
                       recipe["seed"], task)
            model.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: its model is the same
            pass
        # Models of other versions of this file stay (1 MB each): one may be in use by a run of that version.
    finally:
        random.setstate(python_state)
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return final
