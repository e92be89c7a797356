"""LoRA (--lora-rank), each claim against an independent route: the reference (the policy with its adapters off) gives
the log-probs of a separately loaded base model; only the adapters get gradients, the same with and without gradient
checkpointing, in number r·(in + out) per adapted layer; final/ is peft's own merge, loadable without peft; a resumed
run ends with the adapters and Adam moments of one never stopped."""

import pytest
import torch
from safetensors.torch import load_file

from plumbing import adamw, models, run_folder
import apo
import rollout
from conftest import minibatch_gradients
from test_run_folder import assert_same_state, resume_after_step_2, run_logs, toy_args

CPU = torch.device("cpu")


def lora(rank=4, dropout=0.0):
    return models.lora_config(rank, 0, dropout, apo.Args.lora_targets, False)


def trained_as_if(policy):
    """B is 0 when adapters are made (the policy starts as the base model): give them values, as training would."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """A rollout of the tiny base model, 2 prompts × 4 responses, with advantages and KL weights."""
    from PIL import Image
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and on a busy machine, a lot)
    model, processor = models.load_model(str(tiny_model_dir), torch.float32, CPU)
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 56), c) for c in ("red", "blue")],
                                     ["Find x.", "How many sides?"], 784, 3136)
    batch = rollout.sample_responses(model, processor, prompts, 4, rollout.generation_config(processor, 6, 1.0, 1.0),
                                     seed=(1, 0))
    gen = torch.Generator().manual_seed(1)
    batch["advantages"], batch["kl_weights"] = torch.randn(8, generator=gen), torch.rand(8, generator=gen)
    batch["ref_logp"], _ = rollout.batched_logprobs(model, batch, 1.0, 8)
    return batch


def test_the_reference_is_the_base_model_with_the_adapters_off(tiny_model_dir, batch):
    """ℓ_ref through the disabled adapters equals ℓ of a separately loaded base model, to the bit, while the policy
    (in training mode, with LoRA dropout 0.5) differs from it; the reference holds no weights of its own, builds no
    graph even with gradients enabled, and gives the policy its training mode back."""
    policy, reference, _ = models.load_models(str(tiny_model_dir), None, True, True, False, torch.float32, CPU,
                                                  lora=lora(dropout=0.5))
    trained_as_if(policy)
    base, _ = models.load_model(str(tiny_model_dir), torch.float32, CPU)
    expected, _ = rollout.batched_logprobs(base, batch, 1.0, 3)
    assert policy.training
    got, _ = rollout.batched_logprobs(reference, batch, 1.0, 3)
    assert torch.equal(got, expected)
    assert policy.training  # back in training mode, for the update
    assert torch.equal(rollout.batched_logprobs(reference, batch, 1.0, 8)[0],  # no dropout acted
                       rollout.batched_logprobs(base, batch, 1.0, 8)[0])
    mask = batch["response_mask"].bool()
    assert not torch.allclose(rollout.batched_logprobs(policy, batch, 1.0, 3)[0][mask], expected[mask], atol=1e-3)
    assert reference.policy is policy and not list(vars(reference).keys() - {"policy"})  # no second copy
    logp, _ = rollout.response_logprobs(reference, rollout.select(batch, [0, 1]), 1.0)  # gradients enabled here
    assert not logp.requires_grad


def test_a_frozen_vision_tower_runs_once_per_rollout_for_the_same_numbers(tiny_model_dir):
    """LoRA without --lora-vision: the rollout keeps the images' features, and the log-prob passes (the policy, the
    reference with its adapters off, the update) use them instead of running the tower again: the same log-probs
    and adapter gradients as a copy of the prompt and image per response. With --lora-vision the tower has
    adapters that move: nothing is kept."""
    from PIL import Image
    policy, reference, processor = models.load_models(str(tiny_model_dir), None, True, False, False,
                                                      torch.float32, CPU, lora=lora())
    trained_as_if(policy)
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 84), c) for c in ("red", "blue")],
                                     ["Find x.", "How many sides?"], 784, 3136)
    config = rollout.generation_config(processor, 6, 1.0, 1.0)
    rolled = rollout.sample_responses(policy, processor, prompts, 4, config, seed=(1, 0))
    merged = int(prompts["image_grid_thw"][0].prod()) // 4  # image tokens: 2 × 2 patches merge into one
    assert len(rolled["image_features"]) == 8 and rolled["image_features"][0][0].shape[0] == merged
    tower_runs = []
    hook = policy.get_base_model().model.visual.register_forward_hook(lambda *_: tower_runs.append(1))
    mask = rolled["response_mask"].bool()
    for model in (policy, reference):
        shared, _ = rollout.batched_logprobs(model, rolled, 1.0, 3)
        assert not tower_runs  # (the features kept by the rollout)
        alone, _ = rollout.batched_logprobs(model, rolled, 1.0, 3, share_prompt=False)
        assert len(tower_runs) == 3  # (a copy of each image per response, in each of 3 micro-batches)
        tower_runs.clear()
        assert (shared - alone)[mask].abs().max() < 2e-6
    hook.remove()
    rolled.update(advantages=torch.randn(8, generator=torch.Generator().manual_seed(2)), kl_weights=torch.rand(8),
                  ref_logp=rollout.batched_logprobs(reference, rolled, 1.0, 8)[0])
    grads = []
    for share in (True, False):
        args = apo.parse_args(["--micro-batch-size", "3", "--kl-beta", "0.1", "--group-size", "4"]
                              + ([] if share else ["--no-share-prompt"]))
        minibatch_gradients(policy, rolled, list(range(8)), args)
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-7, msg=name)
    with_vision, _, _ = models.load_models(str(tiny_model_dir), None, False, False, False, torch.float32, CPU,
                                           lora=models.lora_config(4, 0, 0.0, apo.Args.lora_targets, True))
    assert "image_features" not in rollout.sample_responses(with_vision, processor, prompts, 2, config)


def test_only_the_adapters_train_with_or_without_gradient_checkpointing(tiny_model_dir, batch):
    """A mini-batch's backward gives gradients to the adapters alone, the same with gradient checkpointing as
    without, and the frozen vision tower and embeddings are no part of its graph; their number is r·(in + out)
    per adapted layer of the tiny config, counted here by hand; the clipped norm is theirs; an optimizer step (over the trainable parameters, as apo.train builds it) moves them and leaves
    every base weight as it was, to the bit."""
    args = apo.parse_args(["--mini-batch-size", "8", "--micro-batch-size", "3", "--kl-beta", "0.1", "--lr", "1e-2"])
    grads = {}
    for checkpointing in (False, True):
        policy, _, _ = models.load_models(str(tiny_model_dir), None, True, checkpointing, False, torch.float32,
                                              CPU, lora=lora())
        trained_as_if(policy)
        policy.zero_grad(set_to_none=True)
        in_graph = {}  # whether the vision tower's output and the embeddings' require grad (they need not)

        def record(name):
            def hook(module, inputs, output):
                in_graph.setdefault(name, getattr(output, "pooler_output", output).requires_grad)
            return hook
        base = policy.get_base_model().model
        hooks = [base.visual.register_forward_hook(record("vision")),
                 base.language_model.embed_tokens.register_forward_hook(record("embeddings"))]
        minibatch_gradients(policy, batch, list(range(8)), args)
        assert in_graph == {"vision": False, "embeddings": False}, checkpointing
        for hook in hooks:
            hook.remove()
        named = dict(policy.named_parameters())
        assert {n for n, p in named.items() if p.grad is not None} == {n for n, p in named.items() if p.requires_grad}
        grads[checkpointing] = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and all("lora_" in n for n in grads[True])
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-8, msg=name)
        assert grad.abs().sum() > 0, name  # A and B both learn (B ≠ 0 here)
    # the tiny model: 2 decoder layers, hidden 64, MLP 128, 4 heads and 2 key/value heads of 16; rank 4
    H, I, kv = 64, 128, 32
    per_layer = (H + H) + (H + kv) + (H + kv) + (H + H) + (H + I) + (H + I) + (I + H)  # q k v o gate up down
    assert sum(g.numel() for g in grads[True].values()) == 4 * 2 * per_layer

    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e9)  # what update_policy clips: all parameters
    assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in grads[True].values()]).norm().item())
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = adamw.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    apo.update_policy(policy, batch, optimizer, args, [1e-2])
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name
    assert len(optimizer.state) == len(grads[True])  # Adam moments for the adapters alone


def test_final_is_peft_s_merge_as_a_plain_model(tiny_model_dir, tmp_path):
    """final/ holds the merged weights W + (α/r)·B·A as a plain HF folder (models.load_model, which eval.py
    uses, loads it without peft), equal to peft's own merge_and_unload of the adapter saved beside it, and it
    answers as the policy does; the policy keeps its base weights unmerged. A resume with other LoRA settings, or
    none, or --fsdp, is a clear error."""
    policy, _, processor = models.load_models(str(tiny_model_dir), None, True, False, False, torch.float32, CPU,
                                                  lora=lora())
    trained_as_if(policy)
    run_folder.save_checkpoint(tmp_path, "final", policy, processor, {"state": {"step": 1}})
    final = tmp_path / "final"
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "model.safetensors").exists()
    merged, _ = models.load_model(str(final), torch.float32, CPU)
    assert not models.is_lora(merged)

    from peft import PeftModel
    base, _ = models.load_model(str(tiny_model_dir), torch.float32, CPU)
    theirs = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    fresh, _ = models.load_model(str(tiny_model_dir), torch.float32, CPU)
    assert not torch.equal(ours["model.language_model.layers.0.mlp.down_proj.weight"],
                           fresh.state_dict()["model.language_model.layers.0.mlp.down_proj.weight"])

    from PIL import Image
    inputs = rollout.encode_prompts(processor, [Image.new("RGB", (56, 56), "red")], ["Find x."], 784, 3136)
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, policy(**inputs).logits, rtol=1e-4, atol=1e-5)
    base_weights = {k.replace(".base_layer", ""): v for k, v in policy.get_base_model().state_dict().items()
                    if "lora_" not in k}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in base_weights.items())

    load = lambda resume_from, config, fsdp=False: models.load_models(  # noqa: E731
        str(tiny_model_dir), resume_from, True, False, fsdp, torch.float32, CPU, lora=config)
    with pytest.raises(SystemExit, match="other LoRA settings"):
        load(final, lora(rank=8))
    with pytest.raises(SystemExit, match="saved with --lora-rank"):
        load(final, None)
    with pytest.raises(SystemExit, match="saved without --lora-rank"):
        load(tiny_model_dir, lora())
    with pytest.raises(SystemExit, match="--fsdp"):
        load(None, lora(), fsdp=True)


def lora_state(out) -> tuple:
    """The adapters of out/final and its merged weights, its Adam moments and its rounding generator."""
    saved = torch.load(out / "final" / "trainer_state.pt", weights_only=True)
    weights = {**load_file(out / "final" / "adapter" / "adapter_model.safetensors"),
               **{f"merged.{k}": v for k, v in load_file(out / "final" / "model.safetensors").items()}}
    return weights, saved["optimizer"]["state"], saved["rng"][0]["rounding"]


@pytest.mark.slow
def test_a_resumed_lora_run_ends_with_the_adapters_and_adam_moments_of_an_uninterrupted_one(toy_dir, tmp_path):
    """bf16 base weights with fp32 adapters, 4 steps, checkpoints (adapter/ alone) every 2. Resumed from
    checkpoint-000002 as if killed after step 2, the run ends with the adapters, merged weights, Adam moments and
    rounding generator of the uninterrupted run, bit for bit, and writes the same metrics and samples."""
    args = toy_args(toy_dir, tmp_path / "run", "--steps", "4", "--save-every", "2", "--dtype", "bfloat16",
                    "--lora-rank", "4")
    out = apo.train(apo.parse_args(args))
    uninterrupted = lora_state(out)
    checkpoint = out / "checkpoint-000002"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()  # the base weights are the run's --model
    adapters = {k: v for k, v in uninterrupted[0].items() if not k.startswith("merged.")}
    assert all(v.dtype == torch.float32 for v in adapters.values())
    assert len(uninterrupted[1]) == len(adapters)  # Adam moments for the adapters alone
    assert all(m["step"] == 8 and m["exp_avg_sq"].abs().sum() > 0 for m in uninterrupted[1].values())

    logs = run_logs(out)
    resume_after_step_2(out, args)
    assert_same_state(lora_state(out), uninterrupted)
    assert run_logs(out) == logs


def test_the_toy_preset_has_a_lora_learning_rate():
    """--lora-rank on the toy raises its learning rate (PRESETS['toy-lora']); an explicit --lr still wins."""
    assert apo.parse_args(["--data", "toy"]).lr == apo.PRESETS["toy"]["lr"]
    toy_lora = apo.parse_args(["--data", "toy", "--lora-rank", "8"])
    assert toy_lora.lr == apo.PRESETS["toy-lora"]["lr"] != apo.PRESETS["toy"]["lr"]
    for field in ("model", "prompts_per_step", "group_size", "max_new_tokens"):  # the rest stays, β aside
        assert getattr(toy_lora, field) == apo.PRESETS["toy"][field]
    assert apo.parse_args(["--data", "toy", "--lora-rank", "8", "--lr", "0.5"]).lr == 0.5
    assert apo.parse_args(["--lora-rank", "8"]).lr == apo.Args.lr  # no preset, no change
