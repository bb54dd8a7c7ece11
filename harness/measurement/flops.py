"""FLOP counting of a variant's eval forward (used by :mod:`harness.measurement.measure`, ``bench.py`` and the runner).

``macs_per_sample`` = multiply-accumulates of the matrix products of one eval forward (``mm``,
``addmm``, ``bmm``, ``matmul``, ``linear``, ``einsum`` and the gate matrix products of the
recurrent layers), per sample; ``flops_per_sample`` = 2 x MACs. This is what
``torch.utils.flop_counter.FlopCounterMode`` counts, and :func:`flops_crosscheck` checks the two
counters agree. Elementwise, reduction and indexing ops are counted as zero on purpose
(:data:`ZERO_FLOP_OPS` says why, op by op); any other op the counter meets and has no rule for is
reported in ``unsupported_ops``, never silently dropped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Callable

import torch
from torch import nn

class TraceOutputs(nn.Module):
    """Wraps a model whose forward returns a dict so that it can be traced by fvcore; returns a
    tuple, ``logits`` first.

    The tracer drops every op whose result does not reach an output (dead code). With
    ``outputs="all"`` (the default) the tuple also holds every other tensor of the output dict
    and the output of every submodule (collected by forward hooks), so nothing the eager
    forward computes is dropped: the autoencoder's decoders and reconstruction loss, or the
    question-only model's per-word BiLSTM whose result it never uses, are counted, as they are
    in the latency and by FlopCounterMode. ``outputs="logits"`` counts only the work on the
    path to the logits.
    """

    def __init__(self, model: nn.Module, outputs: str = "all"):
        super().__init__()
        if outputs not in ("all", "logits"):
            raise ValueError(f"outputs must be 'all' or 'logits', got {outputs!r}")
        self.model, self.outputs = model, outputs

    def forward(self, *inputs):
        if self.outputs == "logits":
            out = self.model(*inputs)
            return out["logits"] if isinstance(out, dict) else out
        seen: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            seen.extend(_tensors(output))

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if m is not self.model]
        try:
            out = self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, dict):
            return (*_tensors(out), *seen)
        rest = [t for k, v in out.items() if k != "logits" for t in _tensors(v)]
        return (out["logits"], *rest, *seen)


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple / list / dict / tensor."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _jit_shape(value) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def rnn_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::lstm`` / ``aten::gru`` / ``aten::rnn_tanh`` / ``aten::rnn_relu``:
    multiply-accumulates of the gate matrix products.

    Every weight matrix of every layer and direction (``w_ih``: (G*H, in), ``w_hh``: (G*H, H),
    and ``w_hr``: (P, H) with projections; G = 4 gates for LSTM, 3 for GRU, 1 for plain RNN) is
    applied once per time step per sequence, so

        MACs = (sequences x time steps) x sum of the weight matrices' sizes

    For an LSTM layer and direction that is ``B x T x 4H(in + H)``. Biases and the elementwise
    gate ops (sigmoid, tanh, the cell update's products and sums: O(H) per step against the
    matrix products' O(H(in + H))) are not counted, as FlopCounterMode does not count them.

    Both schemas are handled: the padded form ``lstm(input, hx, params, has_biases, num_layers,
    dropout, train, bidirectional, batch_first)``, where sequences x steps is the product of the
    input's leading dims whatever ``batch_first`` is, and the packed form ``lstm(data,
    batch_sizes, hx, params, ...)``, where the packed ``data`` has one row per real
    (sequence, step), so padding is not counted.
    """
    packed = inputs[1].type().kind() != "ListType"  # padded: hx (a Tensor[]); packed: batch_sizes
    params_value = inputs[3] if packed else inputs[2]
    node = params_value.node()
    if node.kind() != "prim::ListConstruct":
        raise NotImplementedError(f"recurrent-layer FLOPs: weights come from {node.kind()}, not a list")
    weights = 0
    for p in node.inputs():
        shape = _jit_shape(p)
        if shape is not None and len(shape) == 2:
            weights += shape[0] * shape[1]
    in_shape = _jit_shape(inputs[0])
    steps = math.prod(in_shape[:-1])
    return int(steps * weights)


def einsum_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::einsum``, exact. fvcore's own rule reads the count from
    ``numpy.einsum_path``'s printed report, which rounds it to 4 significant digits (e.g. 6145
    MACs instead of 6144 for each GAT attention-logit einsum at module_dim 768). For two operands
    the MACs are the product of the sizes of all distinct indices (each combination of index
    values is one multiply-add); one operand is a reduction or a permutation (0, as
    FlopCounterMode); more operands, or an ellipsis, fall back to fvcore's rule."""
    from fvcore.nn.jit_handles import einsum_flop_jit as fvcore_einsum

    equation = inputs[0].toIValue().replace(" ", "")
    operands = list(inputs[1].node().inputs())
    lhs = equation.split("->")[0].split(",")
    if "." in equation or len(lhs) != len(operands) or len(operands) > 2:
        return fvcore_einsum(inputs, outputs)
    if len(operands) == 1:
        return 0
    sizes: dict[str, int] = {}
    for letters, value in zip(lhs, operands):
        shape = _jit_shape(value)
        for letter, n in zip(letters, shape):
            sizes[letter] = max(sizes.get(letter, 1), n)  # broadcast dims of size 1
    return int(math.prod(sizes.values()))


#: op -> handle counting MACs (added to, or replacing, fvcore's defaults)
FLOP_HANDLES: dict[str, Callable] = {
    "aten::einsum": einsum_flop_jit,
    "aten::lstm": rnn_flop_jit,
    "aten::gru": rnn_flop_jit,
    "aten::rnn_tanh": rnn_flop_jit,
    "aten::rnn_relu": rnn_flop_jit,
}

_ELEMENTWISE = "elementwise: O(elements), no matrix product; FlopCounterMode counts 0"
_ACTIVATION = "activation: O(elements); FlopCounterMode counts 0"
_REDUCTION = "reduction / normalisation over one dim: O(elements); FlopCounterMode counts 0"
_INDEXING = "indexing / data movement / selection: no arithmetic worth counting; FlopCounterMode counts 0"
_CREATION = "tensor creation: no arithmetic"

#: ops counted as zero FLOPs on purpose (the decision and its reason). Everything here is
#: O(elements) next to the matrix products; counting only matrix products is FlopCounterMode's
#: convention, so the two counters agree and published MAC counts (which also count only matrix
#: products) compare.
ZERO_FLOP_OPS: dict[str, str] = {
    **{f"aten::{op}": _ELEMENTWISE for op in (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "pow", "sqrt", "rsqrt",
        "exp", "log", "reciprocal", "clamp_min", "clamp_max", "lt", "le", "gt", "ge", "eq", "ne", "where",
        "masked_fill", "masked_fill_", "logical_not", "logical_and", "logical_or", "sign", "sin", "cos", "frac",
        "remainder", "floor_divide")},
    **{f"aten::{op}": _ACTIVATION for op in (
        "tanh", "tanh_", "sigmoid", "sigmoid_", "elu", "elu_", "leaky_relu", "leaky_relu_", "relu", "relu_",
        "gelu", "silu", "softplus", "hardtanh")},
    **{f"aten::{op}": _REDUCTION for op in (
        "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "linalg_vector_norm", "norm",
        "softmax", "log_softmax", "_softmax", "_log_softmax", "logsumexp", "cumsum", "var", "std", "any", "all")},
    "aten::layer_norm": "LayerNorm: a normalisation over the features, O(elements) (the transformer family's); "
                        "FlopCounterMode counts 0 (fvcore would count 5 per element)",
    "aten::batch_norm": "BatchNorm at eval is a per-feature affine map, folded into the preceding Linear "
                        "for inference; FlopCounterMode counts 0 (fvcore would count 1-2 per element)",
    **{f"aten::{op}": "loss on the outputs (autoencoder reconstruction): O(elements); FlopCounterMode counts 0"
       for op in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "cross_entropy_loss",
                  "nll_loss", "nll_loss_nd", "binary_cross_entropy")},
    **{f"aten::{op}": _INDEXING for op in (
        "embedding", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "index_select", "take",
        "topk", "sort", "argsort", "expand_as", "repeat", "flip", "roll", "tril", "triu", "masked_select",
        "nonzero", "unique_dim", "broadcast_tensors", "view_as", "numel", "size", "dim", "_pack_padded_sequence",
        "_pad_packed_sequence", "type_as", "to", "clone", "pad", "constant_pad_nd", "repeat_interleave",
        "fill_", "zero_", "dropout", "feature_dropout", "alpha_dropout", "native_dropout")},
    **{f"aten::{op}": _CREATION for op in (
        "eye", "zeros", "ones", "zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "new_full",
        "rand", "randn", "rand_like", "randn_like", "linspace", "scalar_tensor")},
}


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Let ``torch.jit.trace`` run the model: while tracing, ``x.shape[i]`` is a 0-dim tensor, and
    ``DualVGR.kept_clips`` rounds ``keep_ratio * num_clips`` with ``round()``, which tensors do
    not support; convert the count to ``int`` for the duration (the shapes are fixed anyway)."""
    patched = []
    for m in model.modules():
        fn = getattr(type(m), "kept_clips", None)
        if callable(fn) and "kept_clips" not in vars(m):
            m.kept_clips = (lambda n, _m=m, _fn=fn: _fn(_m, int(n)))
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.kept_clips


def _zero_flops(inputs: list, outputs: list) -> int:
    return 0


def flop_analysis(model: nn.Module, inputs: tuple, outputs: str = "all"):
    """A configured ``fvcore.nn.FlopCountAnalysis`` of the eval forward (its unit is MACs):
    :data:`FLOP_HANDLES` registered, :data:`ZERO_FLOP_OPS` ignored, warnings off. The analysis is
    lazy; :func:`count_flops` runs it."""
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(TraceOutputs(model, outputs), tuple(inputs))
    fa.set_op_handle(**FLOP_HANDLES)
    # ignored ops; those fvcore has a default rule for (batch_norm) get a rule that returns 0,
    # since fvcore applies a rule before it looks at the ignore list
    fa.set_op_handle(**{op: (_zero_flops if op in fa._op_handles else None) for op in ZERO_FLOP_OPS})
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    return fa


def count_flops(model: nn.Module, inputs: tuple, outputs: str = "all") -> dict:
    """MACs and FLOPs of one eval forward on ``inputs`` (batch B = ``inputs[0].shape[0]``),
    divided by B. Returns ``macs_per_sample``, ``flops_per_sample`` (= 2 x MACs),
    ``macs_per_sample_by_module`` (top-level modules), ``flops_batch_size`` and
    ``unsupported_ops`` ({op: calls} the counter met and has no rule for: counted as 0 and
    reported; empty for every registered variant)."""
    was_training = model.training
    model.eval()
    batch = int(inputs[0].shape[0])
    logger = logging.getLogger("fvcore")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), _traceable(model):
            warnings.simplefilter("ignore")
            fa = flop_analysis(model, inputs, outputs)
            total = fa.total()
            by_module = fa.by_module()
            unsupported = dict(fa.unsupported_ops())
    finally:
        logger.setLevel(level)
        model.train(was_training)
    top = {name: by_module.get(f"model.{name}", 0) / batch for name, _ in model.named_children()}
    return {"macs_per_sample": total / batch, "flops_per_sample": 2 * total / batch,
            "macs_per_sample_by_module": top, "flops_batch_size": batch,
            "unsupported_ops": dict(sorted(unsupported.items()))}


def torch_flops(model: nn.Module, inputs: tuple) -> int:
    """FLOPs (2 per multiply-add) of one eval forward by ``torch.utils.flop_counter.FlopCounterMode``,
    for the whole batch. oneDNN (CPU) and cuDNN are switched off meanwhile: their fused LSTM
    kernels have no FLOP formula and would count as 0; the native LSTM runs as matrix products."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), \
                    FlopCounterMode(display=False) as counter:
                model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def flops_crosscheck(model: nn.Module, inputs: tuple) -> dict:
    """fvcore (with our handles, x2) against FlopCounterMode on the same forward, whole batch:
    ``fvcore_flops``, ``torch_flops``, ``rel_diff`` = |a - b| / max(a, b) (0 when both are 0),
    and ``unsupported_ops`` of the fvcore count."""
    fv = count_flops(model, inputs)
    a = fv["flops_per_sample"] * fv["flops_batch_size"]
    b = torch_flops(model, inputs)
    rel = abs(a - b) / max(a, b) if max(a, b) else 0.0
    return {"fvcore_flops": a, "torch_flops": b, "rel_diff": rel, "unsupported_ops": fv["unsupported_ops"]}
