"""The pyfunc of a registered model version: texts in, sentence embeddings out.

MLflow saves this file itself with each version ("models from code"), so loading a version unpickles
nothing. `mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["a text", ...])` returns an (N, H)
float32 array; the version's model config chooses `pooling` ("cls" or "mean").
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import sentencepiece as spm
from mlflow.pyfunc import PythonModel


class BertEmbedder(PythonModel):
    def load_context(self, context):
        from pretrain.export import load_model

        model_dir = Path(context.artifacts["model_dir"])
        self.model, self.config = load_model(model_dir)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer" / "spm.model"))
        self.pooling = (context.model_config or {}).get("pooling", "cls")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        # (pyfunc hands the texts over as a DataFrame, per the version's signature; the hint tells MLflow so)
        from pretrain.text import as_texts, embed

        if hasattr(model_input, "columns"):  # a DataFrame: its first column holds the texts
            model_input = model_input[model_input.columns[0]].tolist()
        return embed(self.model, self.sp, as_texts(model_input), self.config["max_seq_length"],
                     (params or {}).get("pooling", self.pooling))


mlflow.models.set_model(BertEmbedder())
