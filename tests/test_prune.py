"""IMP masks against torch.nn.utils.prune, rewinding, mask files and transfer (METHODS.md sections 3 and 4)."""

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from transformers import BertConfig, BertForSequenceClassification

from flatray import config, models
from flatray.methods import imp as prune
from flatray.data import TASKS
from flatray.methods.sam import SAM


def tiny(seed=0):
    torch.manual_seed(seed)
    return models.load_model("tiny-bert", TASKS["toy"])


def test_prunable_set_is_found_from_the_structure():
    for layers in (2, 3):
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers, hidden_size=32,
                                                         num_attention_heads=2, intermediate_size=64))
        names = set(prune.prunable_weights(model))
        assert len(names) == 6 * layers + 1
        layer0 = {n for n in names if ".layer.0." in n}
        for part in ("query", "key", "value", "attention.output.dense", "intermediate.dense", "0.output.dense"):
            assert any(part in n for n in layer0), part
        assert "bert.pooler.dense.weight" in names
        assert not any("embeddings" in n or "classifier" in n or "LayerNorm" in n or n.endswith("bias")
                       for n in names)


def perturb_like_training(model, seed):
    """Stand-in for a level of training; the same change whatever torch.nn.utils.prune renamed ("weight_orig")."""
    g = torch.Generator().manual_seed(seed)
    params = sorted((n.replace("_orig", ""), p) for n, p in model.named_parameters())
    with torch.no_grad():
        for _, p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_three_imp_levels_match_torch_global_unstructured():
    ours_model, ref_model = tiny(), tiny()
    ref_weights = prune.prunable_weights(ref_model)
    ref_modules = {n: m for n, m in ref_model.named_modules() if isinstance(m, torch.nn.Linear)}
    ref_params = [(ref_modules[n.removesuffix(".weight")], "weight") for n in ref_weights]
    total = sum(w.numel() for w in ref_weights.values())
    masks = None
    for level in (1, 2, 3):
        # the "trained" weights of the previous level: same in both models
        perturb_like_training(ours_model, level)
        perturb_like_training(ref_model, level)
        weights = prune.prunable_weights(ours_model)
        masks = prune.magnitude_masks(weights, target=0.1 * level, start=masks)
        # torch: prune the count that takes the remaining weights to 10% more of the ORIGINAL prunable count
        amount = round(0.1 * level * total) - round(0.1 * (level - 1) * total)
        # (score the current weights: torch's `weight` attribute is only refreshed by a forward pass)
        scores = {(m, "weight"): (m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight).detach()
                  for m, _ in ref_params}
        torch_prune.global_unstructured(ref_params, pruning_method=torch_prune.L1Unstructured, amount=amount,
                                        importance_scores=scores)
        for name in weights:
            torch_mask = ref_modules[name.removesuffix(".weight")].weight_mask.bool()
            assert torch.equal(masks[name], torch_mask), f"level {level}: {name}"
        assert prune.sparsity(masks) == pytest.approx(0.1 * level, abs=0.001)
        with torch.no_grad():  # IMP zeroes the pruned weights of our model too
            for name, w in weights.items():
                w.mul_(masks[name])
        per_layer = [1 - m.float().mean().item() for m in masks.values()]
        assert max(per_layer) - min(per_layer) > 0.01  # a global ranking, not 10% of every layer
    model = tiny()
    for name, p in model.named_parameters():  # everything outside the prunable set stays dense
        if name not in masks:
            assert name.startswith(("bert.embeddings", "classifier")) or "LayerNorm" in name or name.endswith("bias")


def test_random_masks_same_sparsity_different_choice():
    weights = prune.prunable_weights(tiny())
    mag = prune.magnitude_masks(weights, 0.3)
    rnd = prune.random_masks(weights, 0.3, seed=1)
    assert prune.sparsity(rnd) == pytest.approx(prune.sparsity(mag), abs=1e-6)
    assert not all(torch.equal(rnd[n], mag[n]) for n in weights)
    assert all(torch.equal(rnd[n], prune.random_masks(weights, 0.3, seed=1)[n]) for n in weights)
    deeper = prune.random_masks(weights, 0.5, seed=2, start=rnd)
    assert all(not (deeper[n] & ~rnd[n]).any() for n in weights)  # never revives a pruned weight


def test_masked_sam_keeps_pruned_weights_zero_and_the_norm_on_kept_weights():
    model = tiny()
    masks = prune.magnitude_masks(prune.prunable_weights(model), 0.5)
    masked = prune.MaskedModel(model, masks)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.01)
    batch = {"input_ids": torch.randint(5, model.config.vocab_size, (4, 10)), "labels": torch.tensor([0, 1, 0, 1])}
    params = dict(model.named_parameters())
    for _ in range(3):
        model(**batch).loss.backward()
        opt.first_step(zero_grad=True)
        for name, m in masks.items():  # the perturbed weights are still zero where pruned
            assert (params[name][~m] == 0).all()
        model(**batch).loss.backward()
        opt.second_step(zero_grad=True)
    for name, m in masks.items():
        assert (params[name][~m] == 0).all() and (params[name][m] != 0).all()
    masked.remove()


def prune_cfg(**kw):
    return config.PruneConfig(**kw)


def save_parent(model, folder, masks=None, task="toy", optimizer="sam"):
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    cfg = config.from_dict({"model": "tiny-bert", "task": task, "optimizer": {"name": optimizer}})
    import yaml

    (folder / "flatray_run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if masks is not None:
        prune.save_masks(folder / prune.MASK_FILE, masks, level=1)
    return folder


def test_rewind_gives_pretrained_values_bit_for_bit(tmp_path):
    trained = tiny()
    perturb_like_training(trained, 5)
    parent = save_parent(trained, tmp_path / "parent")
    model = tiny()  # what a worker loads: pre-trained encoder + head from the seed
    theta0 = copy.deepcopy(model.state_dict())
    masked, masks, meta = prune.setup(model, prune_cfg(parent=str(parent), sparsity=0.2), seed=0)
    assert meta["level"] == 1 and meta["source_task"] == "toy" and meta["optimizer"] == "sam"
    state = model.state_dict()
    for name, value in state.items():
        if name in masks:
            assert torch.equal(value[masks[name]], theta0[name][masks[name]])
            assert (value[~masks[name]] == 0).all()
        else:
            assert torch.equal(value, theta0[name])  # head back to its initial values, embeddings untouched
    # the ranking used the parent's trained weights, not theta_0
    assert not all(torch.equal(masks[n], m) for n, m in
                   prune.magnitude_masks(prune.prunable_weights(tiny()), 0.2).items())
    # "standard" pruning continues from the parent's weights instead
    model2 = tiny()
    prune.setup(model2, prune_cfg(parent=str(parent), sparsity=0.2, rewind="none"), seed=0)
    w = dict(model2.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    t = dict(trained.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    m = masks["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(w[m], t[m])


def test_next_level_starts_from_the_parent_mask(tmp_path):
    level1 = prune.magnitude_masks(prune.prunable_weights(tiny()), 0.1)
    trained = tiny()
    perturb_like_training(trained, 9)
    parent = save_parent(trained, tmp_path / "p", masks=level1)
    _, masks, meta = prune.setup(tiny(), prune_cfg(parent=str(parent), sparsity=0.2), seed=0)
    assert meta["level"] == 2 and prune.sparsity(masks) == pytest.approx(0.2, abs=0.001)
    assert all(not (masks[n] & ~level1[n]).any() for n in masks)


def test_mask_file_round_trip_and_transfer_to_another_task(tmp_path):
    masks = prune.magnitude_masks(prune.prunable_weights(tiny()), 0.7)
    path = tmp_path / "ticket.safetensors"
    prune.save_masks(path, masks, source_task="mrpc", level=7, optimizer="sam", rho=0.05, seed=3,
                     computed_from="run-abc/checkpoint_1")
    loaded, meta = prune.load_masks(path)
    assert all(torch.equal(loaded[n], masks[n]) and loaded[n].dtype == torch.bool for n in masks)
    assert meta == {"source_task": "mrpc", "level": 7, "optimizer": "sam", "rho": 0.05, "seed": 3,
                    "computed_from": "run-abc/checkpoint_1", "sparsity": pytest.approx(0.7, abs=1e-4)}
    # transfer: pre-trained weights + the mask, on a task with another head (QA)
    torch.manual_seed(0)
    qa = models.load_model("tiny-bert", TASKS["squad"])
    _, applied, _ = prune.setup(qa, prune_cfg(mask=str(path)), seed=0)
    weights = list(prune.prunable_weights(qa).values())
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert "bert.pooler.dense.weight" not in applied  # BertForQuestionAnswering has no pooler
    assert zeros == pytest.approx(prune.sparsity(applied), abs=1e-9) == pytest.approx(0.7, abs=0.005)


def test_bad_prune_configs(tmp_path):
    with pytest.raises(config.ConfigError, match="prune.mask.*existing mask file"):
        config.from_dict({"model": "tiny-bert", "task": "toy", "prune": {"mask": str(tmp_path / "none")}})
    with pytest.raises(config.ConfigError, match="prune.parent.*checkpoint folder"):
        config.from_dict({"model": "tiny-bert", "task": "toy", "prune": {"parent": str(tmp_path)}})
    with pytest.raises(config.ConfigError, match="prune.rewind"):
        config.from_dict({"model": "tiny-bert", "task": "toy", "prune": {"rewind": "none", "sparsity": 0.1}})
    with pytest.raises(config.ConfigError, match="prune.sparsity.*less than 1"):
        config.from_dict({"model": "tiny-bert", "task": "toy", "prune": {"sparsity": 1.0}})


def test_random_masks_never_revive_pruned_weights():
    """Like magnitude_masks: a target below the start mask's sparsity is rejected, not met by reviving weights."""
    weights = prune.prunable_weights(tiny())
    start = prune.random_masks(weights, 0.5, seed=0)
    with pytest.raises(ValueError, match="below the start mask"):
        prune.random_masks(weights, 0.3, seed=1, start=start)
    deeper = prune.random_masks(weights, 0.7, seed=1, start=start)
    assert all(not (deeper[n] & ~start[n]).any() for n in weights)
    assert prune.sparsity(deeper) == pytest.approx(0.7, abs=0.001)


@pytest.mark.parametrize("move", [False, True], ids=["cpu", "cuda"])
def test_masks_follow_their_weights_to_bf16_and_another_device(move):
    """Masks are made before DeepSpeed moves and casts the module: the gradient hook and `enforce` must work on
    the cast (and moved) weights, and pruned weights stay exactly zero through SAM's and Adam's steps."""
    if move and not torch.cuda.is_available():
        pytest.skip("no second device here")
    model = tiny()
    masks = prune.magnitude_masks(prune.prunable_weights(model), 0.5)
    masked = prune.MaskedModel(model, masks)
    model.to(device="cuda" if move else "cpu", dtype=torch.bfloat16).train()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, model.config.vocab_size, (4, 10), generator=g).to(device),
             "labels": torch.randint(0, 2, (4,), generator=g).to(device)}
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.01)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(2):
        model(**batch).loss.backward()
        sam.first_step(zero_grad=True)
        model(**batch).loss.backward()
        sam.second_step(zero_grad=True)
        model(**batch).loss.backward()
        adam.step()
        adam.zero_grad()
    masked.enforce()
    weights = prune.prunable_weights(model)
    for name, mask in masks.items():
        w = weights[name]
        assert w.dtype == torch.bfloat16 and (w[~mask.to(device)] == 0).all(), name
        assert (w[mask.to(device)] != 0).any(), name


def test_the_pooler_is_prunable_unless_left_out():
    model = tiny()
    with_pooler, without = set(prune.prunable_weights(model)), set(prune.prunable_weights(model, include_pooler=False))
    assert with_pooler - without == {"bert.pooler.dense.weight"}
    assert all(".encoder." in name for name in without)


def test_an_untrained_pooler_is_left_out_by_default_and_an_explicit_value_wins(tmp_path, capsys):
    from flatray import models
    from flatray.config import PruneConfig

    assert prune.include_pooler(PruneConfig(), "tiny-bert") is True  # METHODS.md: the pooler is prunable
    assert prune.include_pooler(PruneConfig(), "minilm-offline") is False
    assert "pooler is left out" in capsys.readouterr().out
    assert prune.include_pooler(PruneConfig(include_pooler=True), "minilm-offline") is True
    # A checkpoint fine-tuned from minilm-offline (an IMP parent, a oneshot model) answers for its model.
    (tmp_path / "flatray_run.yaml").write_text("model: minilm-offline\ntask: rotten-tomatoes\n")
    assert models.untrained_pooler(str(tmp_path)) == models.UNTRAINED_POOLER["minilm-offline"]
    (tmp_path / "flatray_run.yaml").write_text("model: tiny-bert\ntask: toy\n")
    assert models.untrained_pooler(str(tmp_path)) is None


def test_roberta_layout_prunable_set_head_reset_and_no_pooler(tmp_path, capsys):
    """P1 A.12 runs IMP on RoBERTa-base. Its classification model has no pooler (RobertaModel(add_pooling_layer=
    False)); its head (classifier.dense + classifier.out_proj) sits outside the encoder and is never pruned, and is
    reset to its initial values at a rewind, as BERT's is."""
    from transformers import RobertaConfig, RobertaModel

    from flatray.config import PruneConfig

    torch.manual_seed(0)
    pretrained = tmp_path / "roberta-tiny"
    RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40)).save_pretrained(pretrained)
    base = RobertaModel.from_pretrained(pretrained).state_dict()
    assert any(k.startswith("pooler.") for k in base)  # the checkpoint has one (as roberta-base does) ...

    def load(seed=0):
        torch.manual_seed(seed)
        return models.load_model(str(pretrained), TASKS["toy"])

    model = load()
    names = set(prune.prunable_weights(model))
    assert not any("pooler" in n for n, _ in model.named_parameters())  # ... that the classifier drops
    assert len(names) == 6 * 2 and all(n.startswith("roberta.encoder.layer.") and n.endswith(".weight") for n in names)
    for part in ("query", "key", "value", "attention.output.dense", "intermediate.dense", "0.output.dense"):
        assert any(part in n for n in names if ".layer.0." in n), part
    assert {n for n, _ in model.named_parameters() if n.startswith("classifier.")} == {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"}
    assert prune.include_pooler(PruneConfig(), str(pretrained)) is True and "pooler" not in capsys.readouterr().out

    # A level: rank the parent's trained weights, rewind to theta_0 (encoder pretrained, head from the seed).
    trained = load()
    perturb_like_training(trained, 5)
    parent = save_parent(trained, tmp_path / "parent")
    fresh = load()
    theta0 = copy.deepcopy(fresh.state_dict())
    assert all(torch.equal(theta0["roberta." + k], v) for k, v in base.items() if not k.startswith("pooler."))
    _, masks, _ = prune.setup(fresh, prune_cfg(parent=str(parent), sparsity=0.2), seed=0)
    assert set(masks) == names and prune.sparsity(masks) == pytest.approx(0.2, abs=1e-3)
    for name, value in fresh.state_dict().items():
        if name in masks:
            assert torch.equal(value[masks[name]], theta0[name][masks[name]]) and (value[~masks[name]] == 0).all()
        else:
            assert torch.equal(value, theta0[name])  # the head (dense and out_proj) back to its initial values
    assert not torch.equal(theta0["classifier.out_proj.weight"], trained.state_dict()["classifier.out_proj.weight"])
