"""The pyfunc of a registered fine-tuned model: texts (or text pairs) in, labels and their probabilities out.

MLflow saves this file itself with each version ("models from code"), so loading a version unpickles
nothing. `mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["a text", ...])` returns a DataFrame
with columns `label` and `score` (its probability). Pair models take a DataFrame with the two text
columns of the task under their names (e.g. `premise`, `hypothesis`): the version's signature names them and
MLflow refuses other input before it reaches `predict`. (Called directly, `predict` also takes other column
names, in order, or a list of [first, second] pairs.)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import sentencepiece as spm
import torch
from mlflow.pyfunc import PythonModel


class BertClassifier(PythonModel):
    def load_context(self, context):
        from pretrain.export import load_model

        model_dir = Path(context.artifacts["model_dir"])
        self.model, self.config = load_model(model_dir)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer" / "spm.model"))

    def _texts(self, model_input) -> tuple[list[str], list[str] | None]:
        from pretrain.text import as_texts

        task = self.config["task"]
        pair_field = task.get("text_pair_field")
        if hasattr(model_input, "columns"):  # a DataFrame: the task's columns, else the first one (two)
            cols = list(model_input.columns)
            first = task["text_field"] if task["text_field"] in cols else cols[0]
            texts = as_texts(model_input[first].tolist(), f"column '{first}'")
            if not pair_field:
                return texts, None
            second = pair_field if pair_field in cols else cols[1]
            return texts, as_texts(model_input[second].tolist(), f"column '{second}'")
        rows = list(model_input)
        if pair_field:
            return as_texts([r[0] for r in rows]), as_texts([r[1] for r in rows], "pair")
        return as_texts(rows), None

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        # (pyfunc hands the texts over as a DataFrame, per the version's signature; the hint tells MLflow so)
        from pretrain.text import encode

        texts, pairs = self._texts(model_input)
        labels, scores = [], []
        for i in range(0, len(texts), 64):
            ids, types, mask = encode(self.sp, texts[i:i + 64], self.config["max_seq_length"],
                                      pairs[i:i + 64] if pairs is not None else None)
            p = torch.softmax(self.model(ids, types, mask).float(), -1)
            best = p.max(-1)
            labels += [self.config["labels"][j] for j in best.indices.tolist()]
            scores += best.values.tolist()
        return pd.DataFrame({"label": labels, "score": scores})


mlflow.models.set_model(BertClassifier())
