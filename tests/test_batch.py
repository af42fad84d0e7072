"""Batches for the model from real shards: static masks as written, dynamic masks redrawn per epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.config import CLS_ID, MASK_ID, SEP_ID
from pretrain.batch import Collator
from pretrain.model import BertForPretraining, pretraining_loss
from pretrain.presets import preset


@pytest.fixture(scope="module")
def dataset(small_dataset):
    _, _, root, _ = small_dataset
    m = json.loads((root / "manifest.json").read_text())
    samples = list(wds.WebDataset([str(root / s["name"]) for s in m["splits"]["train"]["shards"]],
                                  shardshuffle=False).decode())
    return m, samples


def test_static_batch_reproduces_the_shard_features(dataset):
    m, samples = dataset
    b = Collator(m)(samples[:8])
    B, L = b.input_ids.shape
    assert B == 8 and L % 8 == 0 and L <= m["examples"]["max_seq_length"]
    for i, s in enumerate(samples[:8]):
        ids = np.frombuffer(s["mp"]["input_ids"], m["examples"]["token_dtype"])
        n = len(ids)
        assert b.input_ids[i, :n].tolist() == ids.tolist() and not b.input_ids[i, n:].any()
        assert b.attention_mask[i].sum() == n
        seg = b.token_type_ids[i]
        assert seg[:s["mp"]["segment_b_start"]].sum() == 0 and seg[n:].sum() == 0
        assert seg[s["mp"]["segment_b_start"]:n].all()
    rows = (b.masked_positions // L).tolist()
    assert rows == sorted(rows), "targets grouped by example, in order"
    flat = b.input_ids.view(-1)[b.masked_positions]
    assert (flat == MASK_ID).float().mean() > 0.6
    assert b.nsp_labels is not None and set(b.nsp_labels.tolist()) <= {0, 1}
    assert b.real_tokens == int(b.attention_mask.sum())


def test_dynamic_masks_are_fresh_per_epoch_and_reproducible(dataset):
    m, samples = dataset
    c = Collator(m, masking="dynamic", seed=3)
    e0, e0_again, e1 = c(samples[:16], epoch=0), c(samples[:16], epoch=0), c(samples[:16], epoch=1)
    assert torch.equal(e0.masked_positions, e0_again.masked_positions)
    assert torch.equal(e0.input_ids, e0_again.input_ids)
    assert not torch.equal(e0.masked_positions, e1.masked_positions)
    static = Collator(m)(samples[:16])
    original = static.input_ids.clone().view(-1)
    original[static.masked_positions] = static.mlm_labels
    for b in (e0, e1):
        assert torch.equal(b.mlm_labels, original[b.masked_positions]), "labels are the original tokens"
        assert not torch.isin(original[b.masked_positions], torch.tensor([CLS_ID, SEP_ID])).any()
        unmasked = torch.ones_like(original, dtype=torch.bool)
        unmasked[b.masked_positions] = False
        assert torch.equal(b.input_ids.view(-1)[unmasked], original[unmasked])
    with pytest.raises(ValueError, match="train.masking"):
        Collator(m, masking="sometimes")


def test_the_model_trains_on_a_batch(dataset):
    m, samples = dataset
    torch.manual_seed(0)
    model = BertForPretraining(preset("tiny", m["tokenizer"]["vocab_size"], max_position=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = Collator(m)(samples[:16])
    losses = []
    for _ in range(15):
        mlm, nsp = model(b.input_ids, b.token_type_ids, b.attention_mask, b.masked_positions)
        loss, _, _ = pretraining_loss(mlm, b.mlm_labels, nsp, b.nsp_labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
