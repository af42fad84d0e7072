"""The BERT encoder with its MLM and NSP heads: pure torch, no I/O, no distribution, no config parsing.

Shapes: B = batch, L = sequence length, H = hidden size, V = vocabulary (padded), M = masked tokens in
the batch. The MLM decoder runs on the M masked positions only (~15% of tokens): its H x V matmul is
the largest in the model for small presets, so this saves most of the head's work. Losses live in
`pretraining_loss`, outside `forward`.

Unpadding (`BertForPretraining(c, unpad=True)`, the training default): embeddings, projections, FFN and
LayerNorms run on the T real tokens of the batch packed as (T, H), not on B x L; only the attention core
sees the padded (B, heads, L, L) layout, filled in and read back by one index copy each way per layer. The
work saved is the batch's padding fraction of nearly all FLOPs (attention scores are ~3% of BERT-base's
FLOPs at L = 128). Both layouts compute the same function (tests/test_model.py).

Variable-length attention (`BertForPretraining(c, unpad=True, varlen=True)`): the attention core too runs on the
packed tokens, each sequence over its own tokens as nested jagged tensors (PyTorch dispatches them to
FlashAttention's varlen kernel on GPUs): no padded copy of q, k and v, no scores over padding.

Compilation (`compile_layers`, on by default for pretraining on GPUs): each encoder layer goes through
`torch.compile`, which fuses the elementwise work between the matmuls (bias + GELU, dropout + residual +
LayerNorm, forward and backward) into a few kernels. The layers share one compiled graph, and the packed
token count T is marked dynamic, so a new batch's T does not recompile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.presets import ModelConfig


def _init(m: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a (B, L) batch are: `index` (T,) their flat positions in B * L, in order;
    `where` (B * L,) each flat position's row in the packed (T, H) tensor (-1 for padding); `first` (B,) the
    packed row of each sequence's first token ([CLS]); `varlen`: attention runs on the packed rows too
    (`varlen_attention`), and `offsets` (B + 1,) says where each sequence's rows start (and the last one ends)."""

    index: torch.Tensor
    where: torch.Tensor
    first: torch.Tensor
    offsets: torch.Tensor | None
    batch: int
    length: int
    varlen: bool = False

    @staticmethod
    def of(attention_mask: torch.Tensor, varlen: bool = False) -> "Packing":
        flat = attention_mask.reshape(-1).bool()
        index = flat.nonzero().squeeze(1)
        where = torch.cumsum(flat, 0) - 1
        where = torch.where(flat, where, torch.full_like(where, -1))
        B, L = attention_mask.shape
        offsets = F.pad(torch.cumsum(attention_mask.bool().sum(1), 0), (1, 0)) if varlen else None
        return Packing(index, where, where.view(B, L)[:, 0], offsets, B, L, varlen)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) packed -> (B, L, D), zeros at padding (differentiable)."""
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, x.shape[-1])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (T, D) real tokens."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)


class Embeddings(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))

    def packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, p: Packing) -> torch.Tensor:
        """(B, L) ids -> (T, H) for the real tokens only."""
        positions = p.index % p.length
        x = (self.word(input_ids.reshape(-1)[p.index]) + self.position(positions)
             + self.token_type(token_type_ids.reshape(-1)[p.index]))
        return self.dropout(self.norm(x))


@torch.compiler.disable  # eager between a compiled layer's graphs: nested attention has no compiled CPU kernel
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_length: int,
                     dropout_p: float) -> torch.Tensor:
    """q, k, v (T, heads, D) packed sequence after sequence, `offsets` (B + 1,) where each starts -> (T, heads, D):
    each sequence attends over its own tokens only (scaled dot-product attention on nested jagged tensors)."""
    def nested(t: torch.Tensor) -> torch.Tensor:  # (B, heads, ragged length, D)
        return torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=1, max_seqlen=max_length).transpose(1, 2)

    y = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout_p)
    return y.transpose(1, 2).values()


class SelfAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor, p: Packing | None = None) -> torch.Tensor:
        """x (B, L, H), or (T, H) packed with `p`; keep (B, 1, 1, L) bool: True for real tokens -> x's shape."""
        dropout_p = self.dropout_p if self.training else 0.0
        if p is not None and p.varlen:
            T, H = x.shape
            q, k, v = (m(x).view(T, self.heads, H // self.heads) for m in (self.query, self.key, self.value))
            return self.out(varlen_attention(q, k, v, p.offsets, p.length, dropout_p).reshape(T, H))
        if p is not None:  # projections on the real tokens, one copy of q, k and v into the padded layout
            # (each Linear is called, not its weight read: ZeRO-3 gathers a module's weights in its forward hook)
            q, k, v = p.pad(torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)).chunk(3, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        B, L, H = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, L, self.heads, H // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, L, H)
        return self.out(p.pack(y) if p is not None else y)


class Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.pre_ln = c.pre_ln
        self.attention = SelfAttention(c)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = nn.Linear(c.intermediate_size, c.hidden_size)
        self.output_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.output(F.gelu(self.intermediate(x))))

    def forward(self, x: torch.Tensor, keep: torch.Tensor, p: Packing | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.attention_norm(x), keep, p))
            return x + self._ffn(self.output_norm(x))
        x = self.attention_norm(x + self.dropout(self.attention(x, keep, p)))
        return self.output_norm(x + self._ffn(x))


class BertEncoder(nn.Module):
    """Embeddings, the transformer layers and the [CLS] pooler."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.pre_ln else nn.Identity()
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, types, mask (B, L), mask 1 for real tokens -> (sequence (B, L, H), pooled [CLS] (B, H))."""
        keep = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.final_norm(x)
        return x, torch.tanh(self.pooler(x[:, 0]))

    def packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
               varlen: bool = False) -> tuple[torch.Tensor, torch.Tensor, Packing]:
        """As `forward` on the real tokens only -> (sequence (T, H), pooled [CLS] (B, H), the packing)."""
        p = Packing.of(attention_mask, varlen)
        keep = attention_mask.bool()[:, None, None, :]
        x = self.embeddings.packed(input_ids, token_type_ids, p)
        for t in (x, p.index):  # T changes every batch: compiled layers take it as a symbol
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for layer in self.layers:
            x = layer(x, keep, p)
        x = self.final_norm(x)
        return x, torch.tanh(self.pooler(x[p.first])), p


class BertForPretraining(nn.Module):
    """BERT with the MLM head (tied to the word embeddings) and the NSP head; `unpad` computes on the real tokens
    only (the same function, less work by the batch's padding fraction), `varlen` attention too."""

    def __init__(self, c: ModelConfig, unpad: bool = False, varlen: bool = False):
        super().__init__()
        if varlen and not unpad:
            raise ValueError("varlen attention runs on the packed tokens: it needs unpad=True")
        self.config = c
        self.unpad, self.varlen = unpad, varlen
        self.bert = BertEncoder(c)
        self.mlm_transform = nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.nsp = nn.Linear(c.hidden_size, 2)
        self.apply(lambda m: _init(m, c.init_std))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) inputs, `masked_positions` (M,) flat indices into B * L -> (MLM logits (M, V), NSP logits (B, 2))."""
        if self.unpad:
            seq, pooled, p = self.bert.packed(input_ids, token_type_ids, attention_mask, self.varlen)
            h = seq.index_select(0, p.where[masked_positions])
        else:
            seq, pooled = self.bert(input_ids, token_type_ids, attention_mask)
            h = seq.reshape(-1, seq.shape[-1]).index_select(0, masked_positions)
        h = self.mlm_norm(F.gelu(self.mlm_transform(h)))
        mlm_logits = F.linear(h, self.bert.embeddings.word.weight, self.mlm_bias)
        return mlm_logits, self.nsp(pooled)


class BertForSequenceClassification(nn.Module):
    """BERT with a classifier on the pooled [CLS] state (fine-tuning); `bert.*` names match BertForPretraining's."""

    def __init__(self, c: ModelConfig, num_labels: int, classifier_dropout: float | None = None):
        super().__init__()
        self.config = c
        self.num_labels = num_labels
        self.bert = BertEncoder(c)
        self.dropout = nn.Dropout(c.dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(c.hidden_size, num_labels)
        self.apply(lambda m: _init(m, c.init_std))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) inputs -> (B, num_labels) logits."""
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(pooled))


def compile_layers(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile each encoder layer of `model` in place (parameter names and checkpoints are unchanged).

    `fullgraph=True`: a layer that cannot be captured whole is an error, not a silent fallback to eager
    pieces. The layers are identical modules, so they share one compiled graph (one compilation). With
    varlen attention, whose core runs eagerly, each layer is three graphs (before the core, the output
    projection, the rest), shared as well.
    """
    encoder = model.bert if hasattr(model, "bert") else model
    for layer in encoder.layers:
        layer.compile(backend=backend, fullgraph=not getattr(model, "varlen", False))
    return model


def pretraining_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, nsp_logits: torch.Tensor | None,
                     nsp_labels: torch.Tensor | None, masked_total: torch.Tensor | None = None,
                     shares: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mlm, nsp) losses: mean cross-entropy over masked tokens, plus over pairs when NSP is on.

    With `masked_total` (the masked tokens of the whole global batch: every micro batch of the step, every rank),
    the MLM loss is this micro batch's part of the global token mean, times `shares` (micro batches x ranks,
    which gradient accumulation and the data-parallel average divide by): each masked token weighs the same."""
    if masked_total is None:  # (a micro batch without a masked token has no MLM loss: 0, not NaN)
        mlm = F.cross_entropy(mlm_logits.float(), mlm_labels, reduction="sum") / max(mlm_labels.numel(), 1)
    else:
        mlm = F.cross_entropy(mlm_logits.float(), mlm_labels, reduction="sum") * shares / masked_total.clamp_min(1)
    if nsp_logits is None or nsp_labels is None:
        return mlm, mlm, torch.zeros((), device=mlm.device)
    nsp = F.cross_entropy(nsp_logits.float(), nsp_labels)
    return mlm + nsp, mlm, nsp


def training_flops(c: ModelConfig, lengths: torch.Tensor, masked: int) -> float:
    """Model FLOPs of one forward + backward (3x forward) on the real tokens of sequences of `lengths` (B,).

    Per token and layer: 2 x (4 H^2 + 2 H I) for the projections and FFN, plus 4 x len x H for
    attention scores and values; per sequence: the pooler (2 H^2); per masked token: the MLM head
    (2 H^2 + 2 H V). Padding is not counted, so MFU measures useful work.
    """
    h, i, n = c.hidden_size, c.intermediate_size, c.num_layers
    tokens = float(lengths.sum())
    squares = float((lengths.double() ** 2).sum())
    forward = n * (2 * (4 * h * h + 2 * h * i) * tokens + 4 * h * squares)
    forward += 2 * h * h * len(lengths) + masked * (2 * h * h + 2 * h * c.vocab_size)
    return 3.0 * forward
