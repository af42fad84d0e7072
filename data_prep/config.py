"""The data-prep config schema: every key, its default and its valid range, in one place."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from data_prep.configfile import Location, Section, config_hash

# Ids fixed by contract: the model and every reader rely on them.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_PIECES)


class TokenizerConfig(Section):
    vocab_size: int = Field(30522, ge=NUM_SPECIAL + 8, le=1_000_000)
    model_type: Literal["unigram", "bpe"] = "unigram"
    path: Location | None = Field(None, description="an existing sentencepiece .model to use instead of training one")
    sample_sentences: int = Field(1_000_000, ge=100, description="sentences sampled across the corpus for training")
    character_coverage: float = Field(0.9995, gt=0.9, le=1.0)
    lowercase: bool = False
    split_digits: bool = True
    threads: int = Field(2, ge=1, description="sentencepiece trainer threads")


class ExamplesConfig(Section):
    max_seq_length: int = Field(128, ge=8, le=8192)
    masked_lm_prob: float = Field(0.15, gt=0.0, lt=1.0)
    max_predictions_per_seq: int = Field(20, ge=1)
    short_seq_prob: float = Field(0.1, ge=0.0, le=1.0)
    nsp: bool = True
    whole_word_mask: bool = False
    dupe_factor: int = Field(1, ge=1, le=100)
    pool_documents: int = Field(
        1000, ge=2, description="documents held together; random next segments are drawn from this pool"
    )


class ShardsConfig(Section):
    examples_per_shard: int = Field(10_000, ge=1)
    group_bytes: int = Field(
        8 * 2**20, ge=1, description="input bytes per work unit (one Ray task); files are grouped in sorted order"
    )


class ReadConfig(Section):
    split_sentences: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: .txt lines are sentences (Google format), .jsonl/.parquet text is segmented"
    )
    max_line_bytes: int = Field(
        4 * 2**20, ge=1024, description="longer lines are skipped and reported (memory stays bounded)"
    )
    min_sentence_chars: int = Field(1, ge=1)


class RayConfig(Section):
    address: str = Field("", description="empty: start a local Ray for this job; else an address for ray.init")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")
    max_retries: int = Field(3, ge=0, description="retries of a failed or lost task")


class DataPrepConfig(Section):
    inputs: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    output: Location
    text_field: str = "text"
    seed: int = Field(12345, ge=0)
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    tokenizer: TokenizerConfig = TokenizerConfig()
    examples: ExamplesConfig = ExamplesConfig()
    shards: ShardsConfig = ShardsConfig()
    read: ReadConfig = ReadConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "DataPrepConfig":
        if self.examples.max_predictions_per_seq > self.examples.max_seq_length:
            raise ValueError("examples.max_predictions_per_seq must not exceed examples.max_seq_length")
        return self

    def content(self) -> dict:
        """Every key that shapes the dataset's bytes: the config less where it goes and how fast (`output`, `ray`)."""
        tree = self.model_dump(mode="json")
        del tree["ray"], tree["output"]
        return tree

    def content_hash(self) -> str:
        return config_hash(self.content())
