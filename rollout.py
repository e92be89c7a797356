"""Rollouts for APO: prompts, G sampled responses per prompt, and per-token log-probs of those responses.

Everything here is about turning (image, problem) pairs into tensors and back; the algorithm itself is in `apo.py`.
A rollout batch is a plain dict of tensors, N = B·G responses, P = prompt length (left-padded), T = response length:

    input_ids       [N, P+T]   prompt then response, pad after the response's EOS
    attention_mask  [N, P+T]   1 on real prompt tokens and on response tokens up to and including the first EOS
    mm_token_type_ids [N, P+T] 1 on image tokens of the prompt, 0 elsewhere (the completion is all text)
    pixel_values    [sum_i patches_i, C·t·p·p]   the images' patches, image after image, sample after sample
    image_grid_thw  [I, 3]     each image's patch grid; image i owns image_grid_thw[i].prod() rows of pixel_values
    image_counts    [N]        images per sample (1 in training: I = N; up to 7 for an MMMU question)
    response_mask   [N, T]     1 on response tokens up to and including the first EOS
    prompt_len      int        P
    prompt_index    [N]        the prompt each response answers (its group)
    prompt_positions [N, 3, P] the prompt's M-RoPE positions (temporal, height, width; 0 on padding)
    image_features  list [N]   only when the vision tower is frozen (LoRA): each response's prompt's image features

The log-prob passes forward these either as they are, a row per response with its own copy of the prompt and
image, or with each prompt once per group (`shared_rows`, the default): the same numbers, fewer tokens.
"""

import copy
import re

import torch
import torch.nn.functional as F
from qwen_vl_utils import fetch_image
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.generation.logits_process import TopPLogitsWarper

INSTRUCTION = ("First think through the problem step by step inside <think> </think>, "
               "then give only the final answer inside <answer> </answer>.")
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def build_messages(problem: str, n_images: int = 1) -> list:
    """One user turn: the image(s), the problem, then the format instruction (APO_SPEC §1, Decision on the prompt).

    A problem that names its images with tags (MMMU: "<image 1>", up to 7) gets each image where its tag first
    stands, the images being given in that order; otherwise the images come first. geometry3k marks its one image
    with "<image>": the mark goes, the chat template places the image."""
    tagged = re.split(r"(<image \d+>)", problem.replace("<image>", "").strip())
    content, seen = [], set()
    for i, part in enumerate(tagged):
        if i % 2 and part not in seen and len(seen) < n_images:  # a tag's first appearance: its image
            seen.add(part)
            content.append({"type": "image"})
        elif part.strip():
            content.append({"type": "text", "text": part.strip("<>") if i % 2 else part})
    content[:0] = [{"type": "image"}] * (n_images - len(seen))  # untagged images: first
    if content[-1]["type"] == "text":
        content[-1] = {"type": "text", "text": f"{content[-1]['text'].rstrip()}\n{INSTRUCTION}"}
    else:
        content.append({"type": "text", "text": INSTRUCTION})
    return [{"role": "user", "content": content}]


def encode_prompts(processor, images: list, problems: list, min_pixels: int, max_pixels: int) -> dict:
    """Chat prompts for a batch of (image or list of images, problem), left-padded so that generation continues
    every row at the end. `image_counts` [N] says how many images each prompt holds (`select` needs it)."""
    images = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    texts = [processor.apply_chat_template(build_messages(p, len(ims)), add_generation_prompt=True, tokenize=False)
             for p, ims in zip(problems, images)]
    # qwen-vl-utils resizes each image to a multiple of 28 px within the pixel budget, as Qwen's own pipeline does.
    flat = [fetch_image({"image": im, "min_pixels": min_pixels, "max_pixels": max_pixels}) for ims in images
            for im in ims]
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    batch = dict(processor(text=texts, images=flat, return_tensors="pt", padding=True, padding_side="left",
                           images_kwargs={"size": size}))
    batch["image_counts"] = torch.tensor([len(ims) for ims in images])
    return batch


def select(batch: dict, rows: list) -> dict:
    """The samples `rows` of a batch (any order, repeats allowed), with their images carried along: sample n owns
    image_counts[n] rows of image_grid_thw, and each image grid_thw.prod() rows of pixel_values."""
    counts = batch.get("image_counts", torch.ones(batch["input_ids"].shape[0], dtype=torch.long)).tolist()
    image_ends = torch.tensor(counts).cumsum(0).tolist()
    patch_ends = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    images = [range(end - n, end) for n, end in zip(counts, image_ends)]  # sample -> its image indices
    out = {k: v[rows] if torch.is_tensor(v) else [v[r] for r in rows] if isinstance(v, list) else v
           for k, v in batch.items()}
    out["image_grid_thw"] = batch["image_grid_thw"][[i for r in rows for i in images[r]]]
    out["pixel_values"] = torch.cat([batch["pixel_values"][patch_ends[images[r].start]:patch_ends[images[r].stop]]
                                     for r in rows])
    if "response_mask" in batch:  # drop the columns that are padding for every selected response
        T, keep = batch["response_mask"].shape[1], int(out["response_mask"].sum(-1).max())
        P = batch["prompt_len"]
        for k, v in out.items():
            if torch.is_tensor(v) and v.dim() == 2 and k != "pixel_values" and v.shape[1] in (T, P + T):
                out[k] = v[:, :keep] if v.shape[1] == T else v[:, :P + keep]
    return out


def generation_config(processor, max_new_tokens: int, temperature: float, top_p: float,
                      do_sample: bool = True) -> GenerationConfig:
    """Sampling settings written out in full, so that nothing is inherited from the checkpoint's own
    generation_config.json (Qwen2.5-VL-Instruct ships top_k=1, top_p=0.001, temperature 0.1 and a repetition
    penalty: near-greedy decoding, which would make every response of a group the same). A field left None is
    filled from that file, then from transformers' defaults (top_k=50): top_k=0 and repetition_penalty=1.0 are
    the values that switch them off, so that responses are sampled from π itself, whose log-probs the loss uses."""
    tok = processor.tokenizer
    eos = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})
    return GenerationConfig(
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None, repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), use_cache=True,
        # A sampled vision token would make the next forward look for an image that is not there: forbid them.
        suppress_tokens=tok.convert_tokens_to_ids(VISION_TOKENS))


def _mix32(x):
    """A bijection of 32-bit integers that spreads every input bit over every output bit (a known integer hash:
    two xor-shift-multiply rounds). Works alike on Python ints and int64 tensors; products stay below 2^63."""
    x = x & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def keyed_uniforms(keys: torch.Tensor, *words: int) -> torch.Tensor:
    """One number in (0, 1) per key, a hash of (key, *words): [n] int64 -> [n] float64. The same on any device,
    in any batch, in any process."""
    x = keys.long()
    for word in words:
        x = _mix32(x ^ _mix32(word))
    return (x.double() + 0.5) / 2 ** 32


class KeyedSampler(LogitsProcessor):
    """Samples each row's next token from π(· | prefix) at the temperature (nucleus `top_p` applied) by inverting
    its CDF at a uniform number keyed by (seed, the row's key, the token's position), instead of drawing from
    the global random stream. So a response depends on the policy and on which response it is (its key: prompt
    of the step, sample of the group), never on what else shares its `generate` call: a run gives the same
    responses on 1 or 8 processes and at any --generation-batch-size (tested), and a resumed run needs no
    sampling state. The distribution is exactly generate's own sampling; only the source of randomness differs.
    Returned as scores that are -inf but for the chosen token, which generate's greedy step then picks."""

    def __init__(self, temperature: float, top_p: float, keys: torch.Tensor, seed: tuple, prompt_len: int):
        """keys [n] int64, on the logits' device (a copy per token would cost a transfer per token)."""
        self.temperature, self.keys, self.seed, self.prompt_len = temperature, keys, seed, prompt_len
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature                                 # [n, V]
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = scores.softmax(-1).cumsum(-1)                                        # [n, V], 0 → ~1
        position = input_ids.shape[1] - self.prompt_len                            # tokens generated so far
        u = keyed_uniforms(self.keys, *self.seed, position)                        # [n] in (0, 1)
        target = (u * cdf[:, -1].double()).float()[:, None]                        # [n, 1], within the total mass
        # the first token whose CDF exceeds u: P(token v) = π_v; a token of probability 0 is never chosen
        token = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def sample_responses(model, processor, prompts: dict, group_size: int, gen_config: GenerationConfig,
                     generation_batch_size: int = 0, seed: tuple = (0,), first_prompt: int = 0) -> dict:
    """G responses per prompt. Returns the rollout batch described at the top of this file, plus
    `response_ids` [N, T], `lengths` [N] (tokens up to and including EOS), `truncated` [N] (no EOS) and `texts`.

    Sampling (gen_config.do_sample) is keyed (KeyedSampler): response k of prompt i has the key
    (first_prompt + i)·G + k under `seed` (ints: in training, the run's seed and the step); `first_prompt` is where
    these prompts stand among all of the step's. Without sampling, decoding is greedy."""
    n_prompts = prompts["input_ids"].shape[0]
    batch = select(prompts, [i for i in range(n_prompts) for _ in range(group_size)])  # prompt i -> rows i·G .. i·G+G-1
    prompt_len, device = batch["input_ids"].shape[1], model.device
    keys = torch.arange(n_prompts * group_size) + first_prompt * group_size                 # [N]
    config = gen_config
    if gen_config.do_sample:  # KeyedSampler samples; generate then only picks its choice (the greedy step)
        config = copy.deepcopy(gen_config)
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    # Gradient checkpointing switches the KV cache off in training mode; decoding without it recomputes the whole
    # prefix at every step (~100x slower). eval() + no_grad + use_cache=True in the config keep it on.
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    step = generation_batch_size or n
    chunks = []
    for start in range(0, n, step):
        rows = list(range(start, min(start + step, n)))
        part = select(batch, rows)
        part = {k: part[k].to(device) for k in MODEL_INPUTS}
        sampler = LogitsProcessorList([KeyedSampler(gen_config.temperature, gen_config.top_p, keys[rows].to(device),
                                                    seed, prompt_len)] if gen_config.do_sample else [])
        # synced_gpus off: under FSDP2 transformers would turn it on, making every rank decode as long as the
        # slowest; parallel.full_weights gathers the whole weights first, so no rank needs another during decoding.
        chunks.append(model.generate(**part, generation_config=config, logits_processor=sampler,
                                     synced_gpus=False)[:, prompt_len:].cpu())
    width = max(c.shape[1] for c in chunks)
    response_ids = torch.cat([F.pad(c, (0, width - c.shape[1]), value=gen_config.pad_token_id) for c in chunks])

    is_eos = torch.isin(response_ids, torch.tensor(gen_config.eos_token_id))
    # Mask up to and including the first EOS: cumsum of EOS flags is 0 before it, and the EOS itself is counted.
    before_eos = (is_eos.cumsum(-1) - is_eos.long()) == 0
    response_mask = before_eos.long()
    truncated = ~is_eos.any(-1)
    batch.update(
        input_ids=torch.cat([batch["input_ids"], response_ids], 1),
        attention_mask=torch.cat([batch["attention_mask"], response_mask], 1),
        mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response_ids)], 1),
        response_ids=response_ids, response_mask=response_mask, lengths=response_mask.sum(-1), truncated=truncated,
        prompt_len=prompt_len, prompt_index=torch.arange(n_prompts).repeat_interleave(group_size),
        texts=processor.batch_decode([r[m.bool()] for r, m in zip(response_ids, response_mask)],
                                     skip_special_tokens=True))
    # For the log-prob passes: the prompts' M-RoPE positions, computed here once and given explicitly (the model's
    # own cache of them, rope_deltas, belongs to the last generate call), and, where the vision tower is frozen (LoRA
    # without --lora-vision), the images' features: the same in the old-policy, reference and update passes.
    vl = vision_language_model(model)
    prompt_positions, _ = vl.get_rope_index(prompts["input_ids"].to(device), prompts["mm_token_type_ids"].to(device),
                                            prompts["image_grid_thw"].to(device),
                                            attention_mask=prompts["attention_mask"].to(device))
    batch["prompt_positions"] = prompt_positions.transpose(0, 1).cpu()[batch["prompt_index"]] * \
        prompts["attention_mask"][batch["prompt_index"], None]                           # [N, 3, P]
    if not any(p.requires_grad for p in vl.visual.parameters()):
        features = vl.get_image_features(prompts["pixel_values"].to(device),
                                         prompts["image_grid_thw"].to(device)).pooler_output   # one per image
        first_image = [0, *prompts["image_counts"].cumsum(0).tolist()]
        batch["image_features"] = [features[first_image[i]:first_image[i + 1]] for i in batch["prompt_index"]]
    model.train(was_training)
    return batch


def vision_language_model(model):
    """The Qwen2_5_VLModel inside `model` (a plain model, LoRA's PeftModel, FSDP2's, the adapters-off reference)."""
    model = getattr(model, "policy", model)  # models.AdaptersOff
    return next(m for m in model.modules() if hasattr(m, "get_rope_index"))


@torch.no_grad()
def answer(model, processor, examples: list, gen_config: GenerationConfig, batch_size: int, min_pixels: int,
           max_pixels: int, samples: int = 1, progress: str = "", seed: int = 0) -> list:
    """`samples` responses to each example ({'images': [...], 'problem': str}), `batch_size` prompts per `generate`
    call. One dict per example: texts, lengths (tokens, EOS included) and truncated, each a list of `samples`.
    Sampled responses are keyed by the example's index and `seed`: the same whatever the batch size."""
    from tqdm import tqdm

    results = []
    for start in tqdm(range(0, len(examples), batch_size), desc=progress, disable=not progress, leave=False):
        part = examples[start:start + batch_size]
        prompts = encode_prompts(processor, [e["images"] for e in part], [e["problem"] for e in part], min_pixels,
                                 max_pixels)
        out = sample_responses(model, processor, prompts, samples, gen_config, seed=(seed,), first_prompt=start)
        for i in range(len(part)):
            rows = slice(i * samples, (i + 1) * samples)
            results.append({"texts": out["texts"][rows], "lengths": out["lengths"][rows].tolist(),
                            "truncated": out["truncated"][rows].tolist()})
    return results


def shared_rows(batch: dict, dtype) -> tuple:
    """The layout that forwards each prompt once per group: one row per prompt of `batch`, the prompt (its left
    padding dropped) and then each of its responses in the batch, up to its EOS, side by side: [P | R1 | … | Rk],
    right-padded to the longest row. Exact, because of three things:
    - a 4D attention mask lets each response see the prompt and its own past, never another response;
    - explicit M-RoPE position ids: each response starts at the prompt's last position + 1, on all three axes, as
      it did when it was sampled;
    - the token o_t of a response is predicted by the hidden state before it in *its* segment: the first one by the
      prompt's last position (not by the end of the response before it).
    Returns the model's inputs ([R, L] rows, [R, 1, L, L] mask, [3, R, L] positions, the rows' images) and, for
    every response token (response by response, in the order of `batch`), its row, the row position whose hidden
    state predicts it, and the token itself: [M] each, M = the batch's response tokens."""
    P, lengths = batch["prompt_len"], batch["response_mask"].sum(-1).tolist()
    groups = {}                                         # prompt -> the batch's rows holding its responses
    for i, prompt in enumerate(batch["prompt_index"].tolist()):
        groups.setdefault(prompt, []).append(i)
    rows, positions, segments = [], [], []
    where = [None] * len(lengths)                       # per response: (row, the positions predicting its tokens)
    for r, members in enumerate(groups.values()):
        keep = batch["attention_mask"][members[0], :P].bool()
        prompt = batch["input_ids"][members[0], :P][keep]                             # [P_r]
        prompt_positions = batch["prompt_positions"][members[0]][:, keep]             # [3, P_r]
        start, offset = int(prompt_positions.max()) + 1, len(prompt)
        tokens, pos, seg = [prompt], [prompt_positions], [torch.zeros(len(prompt), dtype=torch.long)]
        for j, i in enumerate(members, 1):
            n = lengths[i]
            tokens.append(batch["input_ids"][i, P:P + n])
            pos.append((start + torch.arange(n)).expand(3, n))
            seg.append(torch.full((n,), j))
            where[i] = (r, torch.cat([torch.tensor([len(prompt) - 1]), torch.arange(offset, offset + n - 1)]))
            offset += n
        rows.append(torch.cat(tokens))
        positions.append(torch.cat(pos, 1))
        segments.append(torch.cat(seg))
    L = max(len(row) for row in rows)
    pad = lambda x, value: F.pad(x, (0, L - x.shape[-1]), value=value)  # noqa: E731
    input_ids = torch.stack([pad(row, 0) for row in rows])                            # [R, L]
    segment = torch.stack([pad(s, -1) for s in segments])                             # [R, L], -1: padding
    q, k = segment[:, :, None], segment[:, None, :]                                   # query, key: [R, L, 1], [R, 1, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))      # the prompt, and the query's own response so far
    allowed |= torch.eye(L, dtype=torch.bool) & (q < 0)      # padding sees itself (no row of the softmax empty)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    firsts = [members[0] for members in groups.values()]
    images = select({k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw", "image_counts")
                     if k in batch}, firsts)
    inputs = {"input_ids": input_ids, "attention_mask": mask,
              "position_ids": torch.stack([pad(p, 0) for p in positions], 1)}                # [3, R, L]
    if "image_features" in batch:  # a frozen vision tower: its features, computed once per rollout
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
            pooler_output=[f for i in firsts for f in batch["image_features"][i]])}
    else:
        inputs.update(pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"])
    token_row = torch.cat([torch.full((lengths[i],), where[i][0]) for i in range(len(lengths))])
    token_position = torch.cat([where[i][1] for i in range(len(lengths))])
    targets = torch.cat([batch["input_ids"][i, P:P + lengths[i]] for i in range(len(lengths))])
    return inputs, token_row, token_position, targets


def _token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    """log π(target) and the entropy of π, for a chunk of positions: hidden [n, H], targets [n] -> [n], [n]."""
    # [n, V] fp32, the sampling distribution at T; one expression, so that the logits die once normalized
    logp_all = ((hidden @ lm_head_weight.T).float() / temperature).log_softmax(-1)
    with torch.no_grad():  # for logging only: no graph; einsum contracts without an [n, V] product temporary
        entropy = -torch.einsum("nv,nv->n", logp_all.exp(), logp_all)  # H = −Σ_v π_v·log π_v, [n]
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def response_logprobs(model, batch: dict, temperature: float, chunk_tokens: int = 1024, share_prompt: bool = True):
    """Per-token log-probs and entropies of the response tokens under `model`: ([n, T], [n, T]), 0 after a
    response's EOS.

    One forward: with `share_prompt`, of each prompt once with its responses behind it (`shared_rows`); else of
    each response with its own copy of the prompt and image, where `mm_token_type_ids` is what lets the model
    rebuild the 3D rotary positions of the image tokens (without it the log-probs drift from those of sampling).
    Only response positions are projected through the vocabulary, in chunks of `chunk_tokens` positions, each
    recomputed during backward (activation checkpointing), so fp32 logits exist for one chunk at a time, never for
    the whole micro-batch (151,936 × tokens × 4 bytes).
    """
    device, P = model.device, batch["prompt_len"]
    mask = batch["response_mask"].bool()                                     # [n, T]
    # The model's own forward, so that FSDP2 (parallel.py) gathers its outermost weights (embeddings, final norm),
    # but with no logits (logits_to_keep: none): the last hidden state, after the final norm, is projected below.
    none = torch.zeros(0, dtype=torch.long, device=device)
    if share_prompt:
        inputs, token_row, token_position, targets = shared_rows(batch, model.lm_head.weight.dtype)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        hidden = model(**inputs, use_cache=False, logits_to_keep=none, output_hidden_states=True).hidden_states[-1]
        flat_hidden = hidden[token_row.to(device), token_position.to(device)]         # [M, H]: response tokens
        flat_targets = targets.to(device)
    else:
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
        hidden = model(**inputs, use_cache=False, logits_to_keep=none, output_hidden_states=True).hidden_states[-1]
        hidden = hidden[:, P - 1:-1]                                 # position t predicts token t+1: [n, T, H]
        flat_hidden, flat_targets = hidden[mask.to(device)], inputs["input_ids"][:, P:][mask.to(device)]  # [M, H]
    weight = model.lm_head.weight
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_token_logprobs, flat_hidden[piece], weight, flat_targets[piece], temperature,
                                 use_reentrant=False)
        else:
            lp, ent = _token_logprobs(flat_hidden[piece], weight, flat_targets[piece], temperature)
        logps.append(lp)
        entropies.append(ent)
    out = []
    for values in (torch.cat(logps), torch.cat(entropies)):     # [M] -> [n, T], row by row as the mask reads
        full = torch.zeros(mask.shape, dtype=values.dtype, device=device)
        out.append(full.masked_scatter(mask.to(device), values))
    return out[0], out[1]


@torch.no_grad()
def batched_logprobs(model, batch: dict, temperature: float, micro_batch_size: int, chunk_tokens: int = 1024,
                     share_prompt: bool = True):
    """`response_logprobs` over a whole rollout batch, `micro_batch_size` responses at a time (in order, so that a
    group's responses share micro-batches): ([N, T], [N, T])."""
    N, T = batch["response_mask"].shape
    parts = [response_logprobs(model, select(batch, list(range(s, min(s + micro_batch_size, N)))), temperature,
                               chunk_tokens, share_prompt) for s in range(0, N, micro_batch_size)]
    # select() drops the columns that are padding for all of its rows: pad each part back to T (masked positions)
    return tuple(torch.cat([F.pad(p[i], (0, T - p[i].shape[1])) for p in parts]).cpu() for i in (0, 1))
