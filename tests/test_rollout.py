"""rollout.py on a tiny random Qwen2.5-VL: prompts, sampling, masks, micro-batching and log-probs (the chunked
vocabulary projection against the naive full-logits log-softmax: values, gradients, peak memory)."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

import rollout

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, processor = tiny
    images = [Image.new("RGB", (56, 84), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (40, 40))]
    problems = ["<image>How many sides?", "What colour is the shape, and how long is this prompt?", "Find x."]
    return rollout.encode_prompts(processor, images, problems, 28 * 28, 112 * 112)


def test_prompt_layout(tiny, prompts):
    _, processor = tiny
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding: every prompt ends at the right edge
    assert torch.equal(prompts["mm_token_type_ids"].bool(), ids == image_pad)
    # each sample holds as many image tokens as its patch grid gives after the 2×2 merge
    assert torch.equal((ids == image_pad).sum(-1), prompts["image_grid_thw"].prod(-1) // 4)
    text = processor.decode(ids[0][mask[0].bool()])
    assert "<image>" not in text and text.endswith("<|im_start|>assistant\n")
    assert "<|vision_start|><|image_pad|>" in text and rollout.INSTRUCTION in text


def test_select_slices_pixels_per_sample(tiny, prompts):
    _, processor = tiny
    picked = rollout.select(prompts, [2, 0, 0])
    sizes = [int(t * h * w) for t, h, w in prompts["image_grid_thw"]]  # patches per image, one image per sample
    starts = [sum(sizes[:i]) for i in range(3)]
    expected = torch.cat([prompts["pixel_values"][starts[i]:starts[i] + sizes[i]] for i in (2, 0, 0)])
    assert torch.equal(picked["pixel_values"], expected)
    assert torch.equal(picked["input_ids"], prompts["input_ids"][[2, 0, 0]])
    assert torch.equal(picked["image_grid_thw"], prompts["image_grid_thw"][[2, 0, 0]])
    assert picked["pixel_values"].shape[0] == picked["image_grid_thw"].prod(-1).sum()


def test_build_messages_places_tagged_images_where_their_tags_stand():
    parts = lambda messages: [p.get("text", "IMG") for p in messages[0]["content"]]  # noqa: E731
    assert parts(rollout.build_messages("<image>Find x.")) == ["IMG", "Find x.\n" + rollout.INSTRUCTION]
    assert parts(rollout.build_messages("Compare <image 1> and <image 2>. Which is <image 1>?\n(A) 1 (B) 2", 2)) == [
        "Compare ", "IMG", " and ", "IMG", ". Which is ", "image 1", "?\n(A) 1 (B) 2\n" + rollout.INSTRUCTION]
    assert parts(rollout.build_messages("Options: <image 1>", 1)) == ["Options: ", "IMG", rollout.INSTRUCTION]
    assert parts(rollout.build_messages("Two views.", 2)) == ["IMG", "IMG", "Two views.\n" + rollout.INSTRUCTION]


def test_several_images_per_prompt_sample_and_score_like_one(tiny):
    """An MMMU-like batch: prompts with 2, 1 and 3 images. `select` carries each prompt's images along, and the
    training forward's log-probs equal those of generation, as for one image."""
    model, processor = tiny
    colours = ["red", "blue", "green", "white", "black", "yellow"]
    images = [[Image.new("RGB", (56, 56), c) for c in colours[:2]], [Image.new("RGB", (84, 56), colours[2])],
              [Image.new("RGB", (56, 28 * k), c) for k, c in zip((2, 3, 4), colours[3:])]]
    problems = ["Is <image 1> redder than <image 2>?", "Find x.", "<image 1> <image 2> <image 3> Which is tallest?"]
    batch = rollout.encode_prompts(processor, images, problems, 28 * 28, 112 * 112)
    assert batch["image_counts"].tolist() == [2, 1, 3] and batch["image_grid_thw"].shape[0] == 6
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert (batch["input_ids"] == image_pad).sum(-1).tolist() == [sum(per_image[:2]), per_image[2], sum(per_image[3:])]
    picked = rollout.select(batch, [2, 0])
    assert torch.equal(picked["image_grid_thw"], batch["image_grid_thw"][[3, 4, 5, 0, 1]])
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    first_of = [sum(sizes[:i]) for i in range(7)]
    assert torch.equal(picked["pixel_values"], torch.cat([batch["pixel_values"][first_of[3]:first_of[6]],
                                                         batch["pixel_values"][first_of[0]:first_of[2]]]))
    sampled, generation_logp = generate_with_logprobs(model, processor, batch, 6)
    rolled = rollout.sample_responses(model, processor, batch, 1, rollout.generation_config(processor, 6,
                                                                                            TEMPERATURE, 1.0))
    assert torch.equal(rolled["response_ids"], sampled) and rolled["image_grid_thw"].shape[0] == 6
    logp, _ = rollout.batched_logprobs(model, rolled, TEMPERATURE, micro_batch_size=2)  # [0, 1] then [2]
    mask = rolled["response_mask"].bool()
    assert (logp - generation_logp)[mask].abs().max().item() < 1e-5
    grouped = rollout.sample_responses(model, processor, batch, 2, rollout.generation_config(processor, 6, 1.0, 1.0))
    assert grouped["image_counts"].tolist() == [2, 2, 1, 1, 3, 3] and grouped["image_grid_thw"].shape[0] == 12


def generate_with_logprobs(model, processor, batch, max_new_tokens, seed=(0,)):
    """An independent route to the generation-time log-probs: `generate` itself, one row per response, with the
    keyed sampler that sample_responses uses (keys 0, 1, ...), asked for the raw logits of every step."""
    config = rollout.generation_config(processor, max_new_tokens, TEMPERATURE, 1.0)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, output_logits=True,
                  return_dict_in_generate=True)
    P = batch["input_ids"].shape[1]
    sampler = rollout.KeyedSampler(TEMPERATURE, 1.0, torch.arange(batch["input_ids"].shape[0]), seed, P)
    out = model.generate(**{k: batch[k] for k in rollout.MODEL_INPUTS}, generation_config=config,
                         logits_processor=[sampler])
    sampled = out.sequences[:, P:]
    logp = torch.stack([(logits / TEMPERATURE).log_softmax(-1).gather(-1, sampled[:, t:t + 1])[:, 0]
                        for t, logits in enumerate(out.logits)], 1)
    return sampled, logp


def sample(model, processor, prompts, group_size=2, max_new_tokens=10, seed=0, **extra):
    config = rollout.generation_config(processor, max_new_tokens, TEMPERATURE, 1.0)
    for k, v in extra.items():
        setattr(config, k, v)
    return rollout.sample_responses(model, processor, prompts, group_size, config, seed=(seed,))


@pytest.mark.parametrize("share", [True, False])
def test_training_forward_logprobs_equal_generation_logprobs(tiny, prompts, share, monkeypatch):
    """The log-probs that the loss uses are those of the distribution the responses were sampled from (fp32), in
    either layout; and each of the traps of a layout makes them drift."""
    model, processor = tiny
    sampled, generation_logp = generate_with_logprobs(model, processor, rollout.select(prompts, [0, 0, 1, 1, 2, 2]),
                                                      10)
    rolled = sample(model, processor, prompts, group_size=2, seed=0)  # same keys, same seed: the same samples
    assert torch.equal(rolled["response_ids"], sampled)
    logp, entropy = rollout.batched_logprobs(model, rolled, TEMPERATURE, micro_batch_size=4, chunk_tokens=7,
                                             share_prompt=share)
    mask = rolled["response_mask"].bool()
    assert (logp - generation_logp)[mask].abs().max().item() < 1e-5
    assert (entropy[mask] > 0).all() and not logp[~mask].any()
    drift = lambda batch: (rollout.batched_logprobs(model, batch, TEMPERATURE, 6, share_prompt=share)[0]  # noqa
                           - generation_logp)[mask].abs().max().item()
    if not share:  # without mm_token_type_ids the image tokens get text positions
        assert drift(dict(rolled, mm_token_type_ids=torch.zeros_like(rolled["mm_token_type_ids"]))) > 1e-4
        return
    # the shared layout's traps: positions counted as plain text (no M-RoPE) ...
    plain = rolled["attention_mask"][:, :rolled["prompt_len"], None].cumsum(1).transpose(1, 2).expand(-1, 3, -1) - 1
    assert drift(dict(rolled, prompt_positions=plain.clamp(min=0))) > 1e-4
    # ... and a response's first token predicted by the end of the response before it in the row
    rows = rollout.shared_rows

    def after_the_previous_response(batch, dtype):
        inputs, row, position, targets = rows(batch, dtype)
        first = torch.cat([torch.tensor([True]), position[1:] != position[:-1] + 1])  # each response's first token
        in_row = torch.zeros_like(position)
        for i in range(len(position)):  # where each target stands in its row: right after its predictor, except
            in_row[i] = position[i] + 1 if not first[i] or i == 0 or row[i] != row[i - 1] else in_row[i - 1] + 1
        return inputs, row, torch.where(first, in_row - 1, position), targets
    monkeypatch.setattr(rollout, "shared_rows", after_the_previous_response)
    assert drift(rolled) > 1e-4


def test_micro_batching_does_not_change_logprobs(tiny, prompts):
    model, processor = tiny
    rolled = sample(model, processor, prompts, group_size=3)
    whole, _ = rollout.batched_logprobs(model, rolled, TEMPERATURE, micro_batch_size=9)
    mask = rolled["response_mask"].bool()
    for micro in (1, 2, 4):
        parts, _ = rollout.batched_logprobs(model, rolled, TEMPERATURE, micro_batch_size=micro, chunk_tokens=5)
        assert (parts - whole)[mask].abs().max().item() < 1e-5


@pytest.fixture
def biased(tiny_model_dir):
    """A tiny model that prefers the given tokens: their output-projection rows are pushed along the final norm's
    weight, which raises their logits at every position (strength 0.2 for EOS ends about half the responses of 12
    tokens early, measured with the seeds below)."""
    def make(token_ids, strength):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.data = model.lm_head.weight.data.clone()  # untie: the input embeddings stay as they are
            model.lm_head.weight[token_ids] += strength * model.model.language_model.norm.weight
        return model
    return make


def test_vision_tokens_are_never_sampled(tiny, prompts, biased):
    _, processor = tiny
    vision_ids = processor.tokenizer.convert_tokens_to_ids(rollout.VISION_TOKENS)
    model = biased(vision_ids, 3.0)
    # without suppression, this model samples vision tokens all the time
    unguarded = sample(model, processor, prompts, group_size=4, suppress_tokens=None)
    assert torch.isin(unguarded["response_ids"], torch.tensor(vision_ids)).float().mean() > 0.3
    rolled = sample(model, processor, prompts, group_size=4)
    assert not torch.isin(rolled["response_ids"], torch.tensor(vision_ids)).any()


def test_response_mask_stops_after_the_first_eos(tiny, prompts, biased):
    _, processor = tiny
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = biased([eos], 0.2)  # makes EOS likely enough that some responses end early and some run to the limit
    rolled = sample(model, processor, prompts, group_size=6, max_new_tokens=12)
    ids, mask, lengths = rolled["response_ids"], rolled["response_mask"], rolled["lengths"]
    assert rolled["truncated"].any() and (~rolled["truncated"]).any()
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        eos_at = (ids[row] == eos).nonzero().flatten().tolist()
        if rolled["truncated"][row]:
            assert n == ids.shape[1] and not eos_at
        else:
            assert eos_at[0] == n - 1  # the mask includes the first EOS and nothing after it
    assert torch.equal(rolled["attention_mask"][:, rolled["prompt_len"]:], mask)
    # decoded text is the masked response without special tokens
    row = int((~rolled["truncated"]).nonzero()[0])
    assert rolled["texts"][row] == processor.decode(ids[row, :int(lengths[row]) - 1])


def test_select_trims_columns_that_are_padding_everywhere(tiny, prompts, biased):
    _, processor = tiny
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rolled = sample(biased([eos], 0.2), processor, prompts, group_size=6, max_new_tokens=12)
    short = int(rolled["lengths"].argmin())
    picked = rollout.select(rolled, [short])
    n, P = int(rolled["lengths"][short]), rolled["prompt_len"]
    assert picked["response_mask"].shape[1] == n and picked["input_ids"].shape[1] == P + n
    assert torch.equal(picked["input_ids"][0], rolled["input_ids"][short, :P + n])


def test_generation_config_is_fully_explicit(tiny):
    """What generate() runs with, once merged with a checkpoint's generation_config.json like Qwen2.5-VL-Instruct's
    (near-greedy) and transformers' defaults (top_k=50): nothing of them may remain."""
    model, processor = tiny
    config = rollout.generation_config(processor, 64, 1.0, 0.9)
    saved = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, top_k=1, top_p=0.001, temperature=0.1,
                                               repetition_penalty=1.05)
    try:
        merged, _ = model._prepare_generation_config(config)
    finally:
        model.generation_config = saved
    assert (merged.do_sample, merged.temperature, merged.top_p) == (True, 1.0, 0.9) and merged.use_cache
    assert merged.top_k == 0 and merged.repetition_penalty == 1.0  # the values that switch top-k and the penalty off
    greedy = rollout.generation_config(processor, 64, 1.0, 1.0, do_sample=False)
    assert not greedy.do_sample and greedy.temperature is None


def test_keyed_sampling_draws_from_the_distribution():
    """KeyedSampler over 40,000 keys of one position: token frequencies match softmax(logits / T) within 4
    standard errors (deterministic: the keys are fixed), a token of probability 0 (suppressed) is never chosen,
    and with top-p only the nucleus is, in proportion."""
    n, logits = 40_000, torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -torch.inf])
    for top_p in (1.0, 0.8):
        sampler = rollout.KeyedSampler(TEMPERATURE, top_p, torch.arange(n), (7,), prompt_len=3)
        scores = sampler(torch.zeros(n, 3, dtype=torch.long), logits.expand(n, -1).clone())
        assert torch.equal((scores == 0).sum(-1), torch.ones(n, dtype=torch.long))  # one token kept per row
        freq = torch.bincount(scores.argmax(-1), minlength=6).double() / n
        p = (logits / TEMPERATURE).softmax(-1).double()
        if top_p < 1:  # the smallest set of the likeliest tokens holding 0.8 of the mass: here the first two
            assert p[0] < 0.8 <= p[:2].sum()
            p = torch.cat([p[:2] / p[:2].sum(), torch.zeros(4, dtype=torch.double)])
        assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (top_p, freq, p)
        assert freq[5] == 0
    # positions and seeds give other numbers; the same key, position and seed the same number
    u = rollout.keyed_uniforms(torch.arange(1000), 7, 3)
    assert torch.equal(u, rollout.keyed_uniforms(torch.arange(1000), 7, 3)) and 0 < u.min() and u.max() < 1
    assert (u != rollout.keyed_uniforms(torch.arange(1000), 7, 4)).float().mean() > 0.99
    assert abs(u.mean().item() - 0.5) < 0.03 and (u[1:] - u[:-1]).abs().mean() > 0.3  # no drift between keys


def test_a_response_does_not_depend_on_what_shares_its_batch(tiny, prompts):
    """The same prompt, key and seed give the same response whether generated in one call, in calls of 3 rows,
    or with a subset of the prompts (as one of several processes does with its share of a step)."""
    model, processor = tiny
    config = rollout.generation_config(processor, 10, TEMPERATURE, 1.0)
    whole = rollout.sample_responses(model, processor, prompts, 4, config, seed=(3, 1))
    assert torch.equal(rollout.sample_responses(model, processor, prompts, 4, config, 3, seed=(3, 1))["response_ids"],
                       whole["response_ids"])
    part = rollout.sample_responses(model, processor, rollout.select(prompts, [1, 2]), 4, config, seed=(3, 1),
                                    first_prompt=1)
    T = part["response_ids"].shape[1]
    assert torch.equal(part["response_ids"], whole["response_ids"][4:, :T]) and part["texts"] == whole["texts"][4:]
    other = rollout.sample_responses(model, processor, prompts, 4, config, seed=(3, 2))  # another step
    assert other["texts"] != whole["texts"]


# --------------------------------------------------------------------------------------- chunked log-probs
@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    """The tiny model in float64: the only rounding the two routes do differently is then that of the logits to
    fp32 (both compute the log-softmax in fp32, as rollout does), so they agree to a few fp32 ulps (2^-23 each)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def rollout_batch(tiny64):
    """Two prompts of different lengths (left padding), two responses each, of 9, 4, 7 and 1 tokens then padding."""
    _, processor = tiny64
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 84), "red"), Image.new("RGB", (40, 40))],
                                     ["<image>How many sides?", "Find x, the length of the side opposite B."],
                                     28 * 28, 112 * 112)
    batch = rollout.select(prompts, [0, 0, 1, 1])
    gen = torch.Generator().manual_seed(6)
    lengths = torch.tensor([9, 4, 7, 1])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()                   # [4, 9]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    response = torch.where(mask.bool(), torch.randint(0, 400, (4, 9), generator=gen), pad)  # no special tokens
    batch.update(input_ids=torch.cat([batch["input_ids"], response], 1),
                 attention_mask=torch.cat([batch["attention_mask"], mask], 1),
                 mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], 1),
                 response_mask=mask, prompt_len=prompts["input_ids"].shape[1])
    return batch


def naive_logprobs(model, batch):
    """Full-vocabulary logits of every position at once (HF's own forward), fp32 log-softmax, gather."""
    P = batch["prompt_len"]
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                            "image_grid_thw")}).logits[:, P - 1:-1].float() / TEMPERATURE
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, batch["input_ids"][:, P:, None])[..., 0], entropy


def gradients(model, logp, weights) -> dict:
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {**grads, "lm_head.weight": model.lm_head.weight.grad.clone()}  # (tied to the embedding)


@pytest.mark.parametrize("chunk", [1, 5, 7, 21, 1024])  # 21 response tokens; 5, 7 do not divide it; one chunk
def test_chunked_logprobs_equal_naive_values_and_gradients(tiny64, rollout_batch, chunk):
    model, _ = tiny64
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = weights * rollout_batch["response_mask"]
    expected, expected_entropy = naive_logprobs(model, rollout_batch)
    expected_grads = gradients(model, expected, weights)
    logp, entropy = rollout.response_logprobs(model, rollout_batch, TEMPERATURE, chunk_tokens=chunk,
                                              share_prompt=False)
    mask = rollout_batch["response_mask"].bool()  # only response tokens are projected; after its end, 0
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy[mask], expected_entropy.detach()[mask], rtol=1e-6, atol=1e-6)
    assert not logp[~mask].any() and not entropy[~mask].any() and not entropy.requires_grad
    grads = gradients(model, logp, weights)
    assert grads.keys() == expected_grads.keys(), set(grads) ^ set(expected_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    model.zero_grad(set_to_none=True)


def test_batched_logprobs_equal_naive_across_micro_batches_of_different_lengths(tiny64, rollout_batch):
    """No gradients, micro-batches whose longest responses differ (select() trims each to its own length)."""
    model, _ = tiny64
    with torch.no_grad():
        expected, _ = naive_logprobs(model, rollout_batch)
    mask = rollout_batch["response_mask"].bool()
    for micro in (1, 3):
        logp, _ = rollout.batched_logprobs(model, rollout_batch, TEMPERATURE, micro, chunk_tokens=5,
                                           share_prompt=False)
        assert logp.shape == expected.shape
        torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-6, atol=1e-6)


def test_chunked_logprobs_peak_memory():
    """Peak memory of forward + backward through the vocabulary projection, counted tensor by tensor (torch's
    MemTracker: exact, no timing), with bf16 weights as on a GPU. A stand-in model returns fixed hidden states, so
    that the projection is all there is; its vocabulary (20,000) makes a [1, V] fp32 row (80 kB) big next to the
    rest. With a fixed chunk, the peak must not grow with the micro-batch's token count by even an eighth of a row
    per token (what does grow: hidden states and per-token outputs, ~100 bytes per token); with a single chunk of
    all n·T positions (what the naive route holds), it grows by one to five rows per token (the log-softmax kept
    for backward, its gradient, log_softmax's exp and result, the bf16 logits)."""
    from torch.distributed._tools import mem_tracker  # (a private module of torch: an import error says so)
    n, P, H, V = 4, 3, 16, 20_000
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(V, H, generator=gen).to(torch.bfloat16).requires_grad_()

    def peak(T: int, chunk: int) -> int:
        hidden = torch.randn(n, P + T, H, generator=gen).to(torch.bfloat16).requires_grad_()
        def stand_in(**inputs):  # the model's forward, asked for its hidden states
            return SimpleNamespace(hidden_states=(hidden * 1,))
        stand_in.device, stand_in.lm_head = torch.device("cpu"), SimpleNamespace(weight=weight)
        batch = {"input_ids": torch.randint(0, V, (n, P + T), generator=gen), "prompt_len": P,
                 "response_mask": torch.ones(n, T, dtype=torch.long),
                 **{k: torch.zeros(1) for k in ("attention_mask", "mm_token_type_ids", "pixel_values",
                                                "image_grid_thw")}}
        tracker = mem_tracker.MemTracker()
        with tracker:
            logp, _ = rollout.response_logprobs(stand_in, batch, TEMPERATURE, chunk_tokens=chunk,
                                                share_prompt=False)
            logp.sum().backward()
        weight.grad = None
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    row, added = V * 4, n * (9 - 2)  # an fp32 vocabulary row; tokens added going from T = 2 to T = 9
    assert peak(9, chunk=3) - peak(2, chunk=3) < added * row / 8
    assert added * row <= peak(9, chunk=n * 9) - peak(2, chunk=n * 2) <= 5 * added * row


# ------------------------------------------------------------------------------- each prompt once per group
def shared_and_unshared(model, batch, micro, temperature=1.3):
    return [rollout.batched_logprobs(model, batch, temperature, micro, chunk_tokens=13, share_prompt=share)
            for share in (True, False)]


@pytest.fixture(scope="module")
def toy_rollout():
    """The toy's starting model (fp32) and a rollout of it: 3 prompts × 4 responses, cut to very uneven lengths
    (1 to 24 tokens, as if EOS had come early), with made-up advantages and KL weights and a reference that
    differs from the policy (so that every term of the loss pulls)."""
    from plumbing import data, models, toy
    model, processor = models.load_model("toy", torch.float32, torch.device("cpu"))
    table, base, columns = data.load_table("toy", "train")
    examples = [data.prepare_example(table[i], columns, base) for i in range(3)]
    prompts = rollout.encode_prompts(processor, [e["images"] for e in examples], [e["problem"] for e in examples],
                                     28 * 28, toy.IMAGE_SIZE ** 2)
    batch = rollout.sample_responses(model, processor, prompts, 4, rollout.generation_config(processor, 24, 1.3, 1.0),
                                     seed=(0, 7))
    lengths = torch.minimum(batch["lengths"], torch.tensor([1, 24, 3, 17, 9, 2, 24, 11, 5, 20, 1, 14]))
    T, P = batch["response_mask"].shape[1], batch["prompt_len"]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    batch.update(response_mask=mask, lengths=lengths)
    batch["attention_mask"][:, P:] = mask
    gen = torch.Generator().manual_seed(3)
    batch.update(advantages=torch.randn(12, generator=gen), kl_weights=torch.rand(12, generator=gen))
    reference, _ = models.load_model("toy", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for w in reference.parameters():
            w += 0.02 * torch.randn(w.shape, generator=gen)
    batch["ref_logp"] = rollout.batched_logprobs(reference, batch, 1.3, 12, share_prompt=False)[0]
    return model, processor, batch


@pytest.mark.parametrize("micro", [1, 3, 4, 8, 12])  # one each; splitting groups of 4; a group; two; all three
def test_shared_prompts_give_the_log_probs_of_a_copy_per_response(toy_rollout, micro):
    model, _, batch = toy_rollout
    assert batch["lengths"].min() == 1 and batch["lengths"].max() >= 17
    (shared, shared_entropy), (alone, alone_entropy) = shared_and_unshared(model, batch, micro)
    mask = batch["response_mask"].bool()
    assert (shared - alone)[mask].abs().max() < 2e-6 and (shared_entropy - alone_entropy)[mask].abs().max() < 2e-6
    assert not shared[~mask].any()  # nothing after a response's end


def test_a_group_of_one_and_a_prompt_whose_responses_are_far_apart(toy_rollout):
    """G = 1 (each row a prompt and one response), and a micro-batch holding two responses of one prompt with
    another prompt's between them: each prompt still gets one row, the responses in the micro-batch's order."""
    model, _, batch = toy_rollout
    for rows in ([0], [0, 4, 8], [0, 5, 1]):
        part = rollout.select(batch, rows)
        inputs, *_ = rollout.shared_rows(part, torch.float32)
        assert inputs["input_ids"].shape[0] == len(set(part["prompt_index"].tolist()))
        (shared, _), (alone, _) = shared_and_unshared(model, part, len(rows))
        mask = part["response_mask"].bool()
        assert (shared - alone)[mask].abs().max() < 2e-6


@pytest.mark.parametrize("method", ["apo", "grpo"])
def test_shared_prompts_give_the_gradient_of_a_copy_per_response(toy_rollout, method):
    """The gradient of the whole loss (policy term, k3 KL weighted by κ; GRPO: κ = 1) over micro-batches that
    split and join groups, in both layouts."""
    import apo
    from conftest import minibatch_gradients
    model, _, batch = toy_rollout
    batch = dict(batch, kl_weights=batch["kl_weights"] if method == "apo" else torch.ones(12))
    grads = {}
    for share, micro in ((True, 3), (True, 8), (False, 12)):
        args = apo.parse_args(["--data", "toy", "--kl-beta", "0.5", "--temperature", "1.3", "--micro-batch-size",
                               str(micro), "--group-size", "4"] + ([] if share else ["--no-share-prompt"]))
        model.zero_grad(set_to_none=True)
        minibatch_gradients(model, batch, list(range(12)), args)
        grads[share, micro] = [p.grad.clone() for p in model.parameters()]
    scale = max(g.abs().max() for g in grads[False, 12])
    for key in ((True, 3), (True, 8)):
        assert max((a - b).abs().max() for a, b in zip(grads[key], grads[False, 12])) < 1e-5 * scale, key


def test_shared_prompts_in_bf16_drift_no_more_than_bf16_itself(toy_rollout):
    """In bf16 the two layouts round differently (other shapes, other sums): the log-probs they give differ by
    about what bf16 itself costs against fp32, not more (the numbers are in docs/PERF.md)."""
    model, processor, batch = toy_rollout
    from plumbing import models
    bf16, _ = models.load_model("toy", torch.bfloat16, torch.device("cpu"))
    (shared, _), (alone, _) = shared_and_unshared(bf16, batch, 4)
    exact, _ = rollout.batched_logprobs(model, batch, 1.3, 4, share_prompt=False)
    mask = batch["response_mask"].bool()
    layouts, rounding = (shared - alone)[mask].abs().max().item(), (alone - exact)[mask].abs().max().item()
    print(f"\nbf16: shared − unshared {layouts:.3g}, unshared bf16 − fp32 {rounding:.3g} (max |Δ log π|)")
    assert layouts <= 2 * rounding
