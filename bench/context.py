"""What every row of a run shares: the protocol, the float models (loaded once), the data windows."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

import graphopt
from bench.spec import Protocol, SuiteError
from graphopt.errors import GraphoptError
from graphopt.frontends.corpora import corpus_named, lm_windows, minilm_batches
from graphopt.ir import Model

__all__ = ["Context"]


class Context:
    """The protocol's data for one run, and the float models by key and form, loaded on first use.

    `device` is the torch device of training (QAT rows); everything else runs on the CPU.
    """

    def __init__(self, protocol: Protocol, *, device: str = "cpu", log: Callable[[str], None] = print):
        self.protocol, self.device, self.log = protocol, device, log
        self._models: dict[tuple[str, str], Model] = {}

    def model(self, key: str, form: str = "onnx") -> Model:
        """The float model `key` of the protocol in `form` (shared: callers copy before mutating)."""
        if (key, form) not in self._models:
            self._models[(key, form)] = graphopt.load(self.protocol.model_source(key), form=form, log=self.log)
        return self._models[(key, form)]

    def release_models(self) -> None:
        self._models.clear()

    def seed(self) -> None:
        """The protocol's seed for torch, numpy and random, before every build step."""
        import torch

        seed = int(self.protocol["seeds"]["torch"])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ------------------------------------------------------------------------------ data
    def _corpus(self, name: str) -> dict:
        corpora = self.protocol["corpora"]
        if name not in corpora:
            raise SuiteError(f"protocol: corpus '{name}' is not declared (corpora: {', '.join(corpora)})")
        corpus = corpora[name]
        try:
            corpus_named(corpus["source"])
        except GraphoptError as exc:
            raise SuiteError(f"protocol: corpus '{name}': {exc}") from exc
        return corpus

    def windows(self, model: Model, corpus: str, split: str, count: int, length: int) -> list[np.ndarray]:
        """Token windows of a corpus split ("calibration" / "evaluation"), tokenized for `model`."""
        declared = self._corpus(corpus)
        return lm_windows(model.tokenizer, declared[f"{split}_split"], count, length, corpus=declared["source"])

    def evaluation_windows(self, model: Model, corpus: str) -> list[np.ndarray]:
        ev = self.protocol["evaluation"]
        return self.windows(model, corpus, "evaluation", ev["windows"], ev["length"])

    def embedding_batches(self, model: Model, split: str) -> list[dict[str, np.ndarray]]:
        emb = self.protocol["embedding"]
        corpus = self._corpus(self.protocol["calibration"]["corpus"])
        if split == "calibration":
            return minilm_batches(model.tokenizer, corpus["calibration_split"], emb["calib_batches"],
                                  batch=emb["batch"], max_length=emb["calib_max_length"], corpus=corpus["source"])
        return minilm_batches(model.tokenizer, corpus["evaluation_split"], emb["eval_batches"], batch=emb["batch"],
                              max_length=emb["eval_max_length"], corpus=corpus["source"])

    def calibration(self, model: Model) -> list[dict[str, np.ndarray]]:
        """The protocol's calibration feeds for `model`: token windows or sentence batches."""
        if model.task == "embedding":
            return self.embedding_batches(model, "calibration")
        cal = self.protocol["calibration"]
        windows = self.windows(model, cal["corpus"], "calibration", cal["windows"], cal["length"])
        return [{model.inputs[0].name: w} for w in windows]
