"""LSQ quantization-aware training: learned step size quantizers, quantized BERT layers, packed export.

METHODS.md section 8 (Esser et al. 2020, "Learned Step Size Quantization"). A quantizer with step size s maps
v to v_q = round(clip(v / s, -Q_N, Q_P)) * s. Backward (a custom autograd.Function, so the forward is exactly
that product, which the export relies on):
- d v_q / d v = 1 where -Q_N <= v/s <= Q_P, else 0 (straight-through estimator);
- d v_q / d s = round(v/s) - v/s inside the range, -Q_N below it, Q_P above it; the gradient of s is multiplied by
  g = 1 / sqrt(N * Q_P), N = the tensor's number of weights (activations: its number of features, the last dim).
Init: s = init_scale * 2 * mean(|v|) / sqrt(Q_P), for weights when the layer is built, for activations from the
first batch seen (the `initialized` buffer records it, so a state_dict round trip does not re-initialise).

`quantize_model` swaps the encoder's nn.Linear layers (Q, K, V, attention output, intermediate, output; optionally
the pooler) for QuantLinear and, optionally, the embeddings for QuantEmbedding, in place. The task head stays full
precision, as in TernaryBERT and KDLSQ-BERT. The Linear's own Parameters move into the new module, so parameter
names (e.g. "bert.encoder.layer.0.attention.self.query.weight"), prune masks and optimizer state still apply;
the step sizes are new parameters "<layer>.weight_quantizer.step_size" / "<layer>.input_quantizer.step_size".

`export` writes a safetensors file holding each quantized weight as its integer codes bit-packed at b bits, plus
every other tensor of the state_dict (step sizes included) in full precision; `load_exported` rebuilds the model
from it with the same predictions.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from flatray.methods import LSQ_EXPORT_FILE

EXPORT_FILE = LSQ_EXPORT_FILE  # where a run writes its export

FORMAT = "flatray-lsq-v1"
PACKED = ".packed"  # file key of a quantized weight's codes: "<layer>.weight.packed"


def q_range(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """(Q_N, Q_P): signed -2^(b-1)..2^(b-1)-1, signed symmetric +-(2^(b-1)-1) (2 bits: ternary), unsigned
    0..2^b-1 (`symmetric` does not apply to unsigned ranges)."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    if not signed:
        return 0, 2**bits - 1
    half = 2 ** (bits - 1)
    return (half - 1, half - 1) if symmetric else (half, half - 1)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, s, g, q_n, q_p):
        ctx.save_for_backward(v, s)  # v, not v/s: for weights v is the parameter itself, so this costs no memory
        ctx.g, ctx.q_n, ctx.q_p = g, q_n, q_p
        s_v = s.to(v.dtype)
        return (v / s_v).clamp(-q_n, q_p).round() * s_v

    @staticmethod
    def backward(ctx, grad):
        v, s = ctx.saved_tensors
        x = v / s.to(v.dtype)
        below, above = x < -ctx.q_n, x > ctx.q_p
        grad_v = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_v = grad.masked_fill(below | above, 0)
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, -float(ctx.q_n), torch.where(above, float(ctx.q_p), x.round() - x))
            # summed in float32: a bf16 sum over millions of weights would lose the step size's gradient
            grad_s = ((grad.float() * ds.float()).sum() * ctx.g).reshape(s.shape).to(s.dtype)
        return grad_v, grad_s, None, None, None


class LSQQuantizer(nn.Module):
    """Fake-quantizes a tensor with one learned step size (per tensor).

    Activation quantizers initialise from the first batch they see. Under DeepSpeed ZeRO-1/2 or bf16/fp16 the
    optimizer updates its own fp32 master copy of the parameters, so an init that happens after
    `deepspeed.initialize` is overwritten at the first step (checked: at ZeRO-2 s went back to ~1.0): call
    `calibrate` before building the engine. DeepSpeed then broadcasts rank 0's parameters, so every worker
    starts from rank 0's step sizes.
    """

    def __init__(self, bits: int, signed: bool = True, symmetric: bool = False, init_scale: float = 1.0,
                 kind: str = "weight"):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        self.bits, self.signed, self.symmetric, self.init_scale, self.kind = bits, signed, symmetric, init_scale, kind
        self.q_n, self.q_p = q_range(bits, signed, symmetric)
        self.step_size = nn.Parameter(torch.ones(1))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # Python copy of `initialized`: reading the buffer on a GPU would sync every forward

    @torch.no_grad()
    def init_from(self, v: torch.Tensor) -> None:
        s = self.init_scale * 2 * v.detach().abs().float().mean() / math.sqrt(self.q_p)
        self.step_size.copy_(s.clamp_min(1e-8))  # an all-zero first batch must not give s = 0 (division by s)
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # the loaded flag may differ: read the buffer again at the next forward

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            if not bool(self.initialized):
                self.init_from(v)
            self._ready = True
        n = v.numel() if self.kind == "weight" else v.shape[-1]
        return _LSQ.apply(v, self.step_size, 1.0 / math.sqrt(n * self.q_p), self.q_n, self.q_p)

    @torch.no_grad()
    def integers(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes round(clip(v / s, -Q_N, Q_P)), computed exactly as in forward, as int64."""
        return (v / self.step_size.to(v.dtype)).clamp(-self.q_n, self.q_p).round().to(torch.int64)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, range=[-{self.q_n}, {self.q_p}], init_scale={self.init_scale}"


class QuantLinear(nn.Module):
    """An nn.Linear with LSQ-quantized weight and, if `act_bits` is set, LSQ-quantized input.

    The Linear's `weight` and `bias` Parameter objects are taken over (not copied). Activations use the signed
    asymmetric (or, if not `act_signed`, unsigned) range; `symmetric` applies to the weights only.
    """

    def __init__(self, linear: nn.Linear, bits: int, symmetric: bool = False, act_bits: int | None = None,
                 act_signed: bool = True, init_scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)  # accepts None
        w = self.weight
        self.weight_quantizer = LSQQuantizer(bits, True, symmetric, init_scale, "weight").to(w.device, w.dtype)
        self.weight_quantizer.init_from(w)
        self.input_quantizer = None
        if act_bits is not None:
            self.input_quantizer = LSQQuantizer(act_bits, act_signed, False, init_scale, "activation").to(
                w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An nn.Embedding with an LSQ-quantized weight (its Parameter taken over, like QuantLinear's)."""

    def __init__(self, embedding: nn.Embedding, bits: int, symmetric: bool = False, init_scale: float = 1.0):
        super().__init__()
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        w = self.weight
        self.weight_quantizer = LSQQuantizer(bits, True, symmetric, init_scale, "weight").to(w.device, w.dtype)
        self.weight_quantizer.init_from(w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_quantizer(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


@dataclass
class QuantSpec:
    """What quantize_model quantizes and how (saved with an export, so load_exported rebuilds the same model)."""

    weight_bits: int = 4  # 2, 3, 4 or 8
    act_bits: int | None = 8  # inputs of the quantized Linears; None = full precision
    symmetric: bool = False  # weights in +-(2^(b-1) - 1): ternary at 2 bits (TernaryBERT)
    act_signed: bool = True  # BERT's Linear inputs (LayerNorm outputs, attention context) are signed
    embedding_bits: int | None = None  # None = full-precision embeddings; 8 is typical
    init_scale: float = 1.0  # multiplies every step size's init (weights and activations)
    layers: str = "encoder"  # "encoder" (Q, K, V, attention output, intermediate, output) | "encoder+pooler"

    # No checks here: users write these values in a run config's `squat` section, which validates them.

    @classmethod
    def of(cls, squat) -> "QuantSpec":
        """The quantizer settings of a run config's `squat` section."""
        return cls(weight_bits=squat.weight_bits, act_bits=squat.act_bits, symmetric=squat.symmetric,
                   embedding_bits=squat.embedding_bits, init_scale=squat.init_scale, layers=squat.layers)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap the layers `spec` names for quantized ones, in place; the spec is kept as `model.lsq_spec`."""
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no .base_model.encoder: not a BERT-family encoder")
    pooler = getattr(base, "pooler", None)
    parts = [encoder] + ([pooler] if spec.layers == "encoder+pooler" and pooler is not None else [])
    linears = {id(m) for part in parts for m in part.modules() if isinstance(m, nn.Linear)}
    embeddings = set()
    if spec.embedding_bits is not None:
        embeddings = {id(m) for m in base.embeddings.modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if id(module) in linears:
            new = QuantLinear(module, spec.weight_bits, spec.symmetric, spec.act_bits, spec.act_signed,
                              spec.init_scale)
        elif id(module) in embeddings:
            new = QuantEmbedding(module, spec.embedding_bits, spec.symmetric, spec.init_scale)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.lsq_spec = spec
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batch: dict) -> None:
    """Initialise the activation step sizes from one batch (a forward pass); call it before deepspeed.initialize."""
    model(**batch)
    missing = [n for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and not bool(m.initialized)]
    if missing:
        raise RuntimeError(f"quantizers not reached by the forward pass: {missing[:3]}")


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear | QuantEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def step_size_params(model: nn.Module) -> list[nn.Parameter]:
    return [m.step_size for m in model.modules() if isinstance(m, LSQQuantizer)]


def latent_params(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a step size (the latent full-precision weights, biases, head, ...)."""
    steps = {id(p) for p in step_size_params(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in steps]


def layer_type(name: str) -> str:
    """query, key, value, attention_output, intermediate, output, pooler or embeddings, from a module name."""
    last = name.rsplit(".", 1)[-1]
    if last in ("query", "key", "value"):
        return last
    for suffix, kind in (("attention.output.dense", "attention_output"), ("intermediate.dense", "intermediate"),
                         ("output.dense", "output"), ("pooler.dense", "pooler")):
        if name.endswith(suffix):
            return kind
    return "embeddings" if ".embeddings." in f".{name}." else last


@torch.no_grad()
def level_fractions(model: nn.Module) -> dict[str, float]:
    """Fraction of the quantized Linear weights at each integer level -Q_N..Q_P, e.g. {"quant/level=-2": 0.1, ...}.
    Embedding codes are left out: they usually have another bit width."""
    linears = [m for m in quantized_layers(model).values() if isinstance(m, QuantLinear)]
    if not linears:
        raise ValueError("no QuantLinear layers: quantize the model with quantize_model first")
    q_n, q_p = linears[0].weight_quantizer.q_n, linears[0].weight_quantizer.q_p
    counts = sum(torch.bincount((m.weight_quantizer.integers(m.weight) + q_n).flatten().cpu(),
                                minlength=q_n + q_p + 1) for m in linears)
    total = int(counts.sum())
    return {f"quant/level={level}": int(c) / total for level, c in zip(range(-q_n, q_p + 1), counts)}


@torch.no_grad()
def mean_step_sizes(model: nn.Module) -> dict[str, float]:
    """Mean weight step size per layer type: {"quant/step/query": ..., "quant/step/intermediate": ..., ...}."""
    groups: dict[str, list[float]] = {}
    for name, m in quantized_layers(model).items():
        groups.setdefault(layer_type(name), []).append(float(m.weight_quantizer.step_size))
    return {f"quant/step/{kind}": sum(v) / len(v) for kind, v in groups.items()}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a uint8 stream of ceil(n * bits / 8) bytes: code i fills bits
    [i*bits, (i+1)*bits) of the stream, least significant bit first (3-bit codes straddle bytes, no padding)."""
    codes = codes.flatten()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to be packed at {bits} bits")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    stream = ((codes[:, None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The `numel` codes of `pack_bits`, as int64."""
    if packed.numel() != math.ceil(numel * bits / 8):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.int64)
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).flatten()
    stream = stream[: numel * bits].view(numel, bits).to(torch.int64)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


@torch.no_grad()
def export(model: nn.Module, path: str | Path) -> None:
    """safetensors file: "<layer>.weight.packed" (uint8 codes + Q_N, bit-packed) for each quantized weight, with
    its shape, bits, Q_N and dtype in the metadata entry "quantized"; every other state_dict tensor (step sizes,
    `initialized` flags, biases, LayerNorm, unquantized embeddings, head) as it is. Metadata also holds the
    QuantSpec ("spec", JSON) and the model config ("config", with `architectures` set to the model's class)."""
    spec = getattr(model, "lsq_spec", None)
    if spec is None:
        raise ValueError("the model was not quantized with quantize_model (no lsq_spec)")
    tensors, quantized = {}, {}
    for name, m in quantized_layers(model).items():
        q, key = m.weight_quantizer, f"{name}.weight"
        tensors[key + PACKED] = pack_bits(q.integers(m.weight).cpu() + q.q_n, q.bits)
        quantized[key] = {"shape": list(m.weight.shape), "bits": q.bits, "q_n": q.q_n,
                          "dtype": str(m.weight.dtype).removeprefix("torch.")}
    for key, value in model.state_dict().items():
        if key not in quantized:
            tensors[key] = value.detach().cpu().contiguous()
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained does: e.g. tiny-bert's says BertModel
    metadata = {"format": FORMAT, "spec": json.dumps(asdict(spec)), "quantized": json.dumps(quantized),
                "config": config.to_json_string(use_diff=False)}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a reader never sees half a file


def load_exported(path: str | Path, model_class=None) -> nn.Module:
    """The model `export` wrote, in eval mode: built from the stored config (class from config.architectures
    unless `model_class` is given), quantized with the stored spec, weights set to codes * s."""
    import transformers
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    config_dict = json.loads(meta["config"])
    config = transformers.AutoConfig.for_model(**config_dict)
    cls = model_class or getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = cls(config)
    quantized = json.loads(meta["quantized"])
    # a bf16 engine's export is rebuilt in bf16: codes * s then rounds as it did in the exported model
    model.to(getattr(torch, next(iter(quantized.values()))["dtype"]))
    quantize_model(model, QuantSpec(**json.loads(meta["spec"])))
    tensors = load_file(str(path))
    for key, info in quantized.items():
        codes = unpack_bits(tensors.pop(key + PACKED), info["bits"], math.prod(info["shape"])) - info["q_n"]
        dtype = getattr(torch, info["dtype"])
        step = tensors[key.removesuffix("weight") + "weight_quantizer.step_size"].to(dtype)
        # codes * s in the weight's dtype, as the quantizer's forward computes it: v/s then rounds back to the
        # same codes, so the loaded model's quantized weights equal the exported model's bit for bit
        tensors[key] = (codes.to(dtype) * step).view(info["shape"])
    model.load_state_dict(tensors, strict=True)
    return model.eval()
