"""Our models as transformers models: weight names, `BertConfig` fields, a fast tokenizer, and the export.

`python -m pretrain export MODEL --format hf --out DIR` writes a directory that
`AutoModel` / `BertForPreTraining` (or, for a fine-tuned model, `BertForSequenceClassification`) and
`AutoTokenizer` load with `from_pretrained(DIR)`. The name mapping is pure (the equivalence test uses it);
transformers and tokenizers are imported only by the export. Only the post-LayerNorm model has a
transformers counterpart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from data_prep.config import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from pretrain.presets import ModelConfig

# (our name pattern, transformers' name); {i} is a layer index.
_NAMES = [
    ("bert.embeddings.word.", "bert.embeddings.word_embeddings."),
    ("bert.embeddings.position.", "bert.embeddings.position_embeddings."),
    ("bert.embeddings.token_type.", "bert.embeddings.token_type_embeddings."),
    ("bert.embeddings.norm.", "bert.embeddings.LayerNorm."),
    ("bert.layers.{i}.attention.query.", "bert.encoder.layer.{i}.attention.self.query."),
    ("bert.layers.{i}.attention.key.", "bert.encoder.layer.{i}.attention.self.key."),
    ("bert.layers.{i}.attention.value.", "bert.encoder.layer.{i}.attention.self.value."),
    ("bert.layers.{i}.attention.out.", "bert.encoder.layer.{i}.attention.output.dense."),
    ("bert.layers.{i}.attention_norm.", "bert.encoder.layer.{i}.attention.output.LayerNorm."),
    ("bert.layers.{i}.intermediate.", "bert.encoder.layer.{i}.intermediate.dense."),
    ("bert.layers.{i}.output.", "bert.encoder.layer.{i}.output.dense."),
    ("bert.layers.{i}.output_norm.", "bert.encoder.layer.{i}.output.LayerNorm."),
    ("bert.pooler.", "bert.pooler.dense."),
    ("mlm_transform.", "cls.predictions.transform.dense."),
    ("mlm_norm.", "cls.predictions.transform.LayerNorm."),
    ("nsp.", "cls.seq_relationship."),
    ("classifier.", "classifier."),
]


def _rename(name: str) -> str:
    if name == "mlm_bias":
        return "cls.predictions.bias"
    for ours, theirs in _NAMES:
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(\d+)")
        m = re.match(pattern, name)
        if m:
            return theirs.replace("{i}", m.group(1) if m.groups() else "") + name[m.end():]
    raise KeyError(f"no transformers name for parameter '{name}'")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> `BertForPreTraining`'s or `BertForSequenceClassification`'s (the MLM decoder weight is
    the tied word embedding)."""
    if any(k.startswith("bert.final_norm.") for k in state):
        raise ValueError("a pre-LayerNorm model has no transformers BERT counterpart")
    out = {_rename(k): v for k, v in state.items()}
    if "cls.predictions.bias" in out:
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def hf_config_fields(c: ModelConfig) -> dict:
    """Keyword arguments for `transformers.BertConfig` describing the same network."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, initializer_range=c.init_std, pad_token_id=0,
    )


def fast_tokenizer(spm_file: Path, max_len: int):
    """A transformers fast tokenizer giving the same ids as `pretrain.text.encode` with our sentencepiece model.

    Built from the model file itself: the pieces and scores (unigram) or merges (BPE), sentencepiece's
    precompiled normalizer, its whitespace rules (drop leading, trailing and repeated spaces; "▁" marks a
    word start) and BERT's [CLS] a [SEP] b [SEP] template with segment ids 0 and 1.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast

    proto = pb.ModelProto()
    proto.ParseFromString(Path(spm_file).read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM:
        tok = Tokenizer(Unigram(pieces, unk_id=UNK_ID, byte_fallback=False))
    elif proto.trainer_spec.model_type == pb.TrainerSpec.BPE:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        tok = Tokenizer(BPE(vocab, _bpe_merges(vocab), unk_token=pieces[UNK_ID][0], fuse_unk=True))
    else:
        raise ValueError(f"{spm_file}: only unigram and BPE sentencepiece models have a transformers counterpart")
    norm = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if proto.normalizer_spec.precompiled_charsmap:
        norm.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    # First, the cleaning pretraining's corpus had (`data_prep.sources.plain_text`: its two character classes, in
    # the syntax of tokenizers' regexes, Oniguruma's, where "\x85" would be a byte)
    norm[:0] = [normalizers.Replace(Regex(r"[\x{0}-\x{8}\x{b}\x{c}\x{e}-\x{1f}\x{7f}-\x{9f}]"), " "),
                normalizers.Replace(Regex(r"[\x{feff}\x{200b}\x{fffd}]"), "")]
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    names = {i: pieces[i][0] for i in (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)}
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names.values()])
    cls, sep = names[CLS_ID], names[SEP_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, CLS_ID), (sep, SEP_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, pad_token=names[PAD_ID],
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                   unk_token=names[UNK_ID], cls_token=cls, sep_token=sep, mask_token=names[MASK_ID])


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges of a sentencepiece BPE model, in its order: a piece's id is the rank of the merge making it."""
    found = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def export_hf(model_dir: str | Path, out: str | Path) -> Path:
    """A model directory (pretrained or fine-tuned) -> a transformers directory at `out`, written atomically."""
    try:
        import transformers
    except ImportError:
        raise ImportError("--format hf needs transformers: pip install -e '.[hf]' in the project") from None
    from pretrain.export import CLASSIFIER_FORMAT, load_model, publish

    d = Path(model_dir)
    model, config = load_model(d)
    c: ModelConfig = model.config
    if c.pre_ln:
        raise ValueError(f"{d} holds a pre-LayerNorm model (model.pre_ln=true): transformers' BERT is post-LayerNorm")
    fields = hf_config_fields(c)
    classifier = config["format"]["name"] == CLASSIFIER_FORMAT["name"]
    if classifier:
        labels = [str(v) for v in config["labels"]]
        hf_config = transformers.BertConfig(**fields, architectures=["BertForSequenceClassification"],
                                            id2label=dict(enumerate(labels)),
                                            label2id={n: i for i, n in enumerate(labels)},
                                            classifier_dropout=config.get("classifier_dropout"))
        hf_model = transformers.BertForSequenceClassification(hf_config)
    else:
        hf_config = transformers.BertConfig(**fields, architectures=["BertForPreTraining"])
        hf_model = transformers.BertForPreTraining(hf_config)
    state = to_hf_state_dict(model.state_dict())
    expected = hf_model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if "position_ids" not in k)
    if unknown or missing:
        raise ValueError(f"weights do not map onto transformers' BERT (unknown {unknown[:3]}, missing {missing[:3]})")
    hf_model.load_state_dict(state, strict=False)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp)
    fast_tokenizer(d / "tokenizer" / "spm.model", config["max_seq_length"]).save_pretrained(tmp)
    # The class's name in transformers 4 and 5 alike (5 writes its new name, TokenizersBackend, which 4 lacks)
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "PreTrainedTokenizerFast"},
                                                          indent=2))
    shutil.copyfile(d / "tokenizer" / "spm.model", tmp / "spm.model")
    for name in ("dataset.json", "training.json"):  # provenance travels with the weights
        shutil.copyfile(d / name, tmp / f"bertforge_{name}")
    return publish(tmp, out)
