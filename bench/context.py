"""What every row of a run shares: the protocol, the float models (loaded once), the data windows."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import yaml

import graphopt
from bench.spec import ROOT, Protocol, SuiteError
from graphopt.errors import GraphoptError
from graphopt.frontends.calibration import CalibrationSpec, ImageSpec, Source, parse_image_spec
from graphopt.frontends.corpora import corpus_named, lm_windows, minilm_batches
from graphopt.ir import Model
from graphopt.recipe import parse_recipe

__all__ = ["Context", "package_path"]


def package_path(source: str) -> str:
    """`package:DIST/PATH` as the path of PATH inside the installed distribution DIST (a model or
    an image folder a package ships), `synthetic:...` as the file bench.synthetic makes; any other
    source as it is."""
    if source.startswith("synthetic:"):
        from bench.synthetic import synthetic_model

        return str(synthetic_model(source))
    if not source.startswith("package:"):
        return source
    import importlib.metadata

    dist, _, inner = source[len("package:"):].partition("/")
    try:
        path = importlib.metadata.distribution(dist).locate_file(inner)
    except importlib.metadata.PackageNotFoundError:
        raise SuiteError(f"protocol: {source}: the package '{dist}' is not installed (make setup installs it)") from None
    if not path.exists():
        raise SuiteError(f"protocol: {source}: '{inner}' is not in the installed '{dist}'")
    return str(path)


class Context:
    """The protocol's data for one run, and the float models by key and form, loaded on first use.

    `device` is the torch device of training (QAT rows); everything else runs on the CPU.
    """

    def __init__(self, protocol: Protocol, *, device: str = "cpu", log: Callable[[str], None] = print):
        self.protocol, self.device, self.log = protocol, device, log
        self._models: dict[tuple[str, str], Model] = {}
        self._keys: dict[str, str] = {}  # model name -> protocol key, for image preprocessing
        self._sets: dict[tuple[str, int], tuple[Model, list]] = {}  # (set, model) -> feeds, made once a run

    def model(self, key: str, form: str = "onnx") -> Model:
        """The float model `key` of the protocol in `form` (shared: callers copy before mutating).
        A source `package:DIST/PATH` is a file inside the installed distribution DIST."""
        if (key, form) not in self._models:
            model = graphopt.load(package_path(self.protocol.model_source(key)), form=form, log=self.log)
            self._models[(key, form)], self._keys[model.name] = model, key
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

    def image_spec(self, model: Model) -> ImageSpec:
        """The protocol's preprocessing of `model`'s images (images.preprocessing.<model key>)."""
        key = self._keys.get(model.name)
        table = self.protocol["images"]["preprocessing"]
        if key not in table:
            raise SuiteError(f"protocol: images.preprocessing has no entry for model '{key or model.name}'")
        try:
            return parse_image_spec(table[key], f"protocol: images.preprocessing.{key}")
        except GraphoptError as exc:
            raise SuiteError(str(exc)) from exc

    def image_feeds(self, model: Model, split: str) -> list[dict[str, np.ndarray]]:
        """The protocol's images for `model`, preprocessed: the first `calibration` of the folder
        (name order) for "calibration", the `evaluation` after them for "evaluation"."""
        images = self.protocol["images"]
        skip = 0 if split == "calibration" else images["calibration"]
        source = Source(str(package_path(images["source"])), skip=skip, pattern=images.get("pattern", "*"))
        return CalibrationSpec(sources=(source,), windows=images[split], image=self.image_spec(model)).feeds(model)

    def calibration_set(self, name: str) -> CalibrationSpec:
        """The protocol's calibration set `name` (calibration.sets), read as the calibration section of
        a recipe in samples/recipes/ (its files resolve as the recipes' do), so it compares equal to
        the section of a recipe that names the same sources."""
        sets = self.protocol["calibration"].get("sets", {})
        if name not in sets:
            raise SuiteError(f"protocol: calibration.sets has no set '{name}' ({', '.join(sets) or 'none'})")
        text = yaml.safe_dump({"passes": [], "calibration": sets[name]}, sort_keys=False)
        try:
            return parse_recipe(text, ROOT / "samples" / "recipes" / f"protocol.yaml#calibration.sets.{name}").calibration
        except GraphoptError as exc:
            raise SuiteError(f"protocol: calibration.sets.{name}: {exc}") from exc

    def calibration(self, model: Model, set_name: str | None = None) -> list[dict[str, np.ndarray]]:
        """The protocol's calibration feeds for `model`: token windows, sentence batches or images;
        with `set_name`, the feeds of that calibration set (made once per model and run: a set may
        hold windows the model writes itself)."""
        if set_name is not None:
            key = (set_name, id(model))
            if key not in self._sets:
                try:
                    self._sets[key] = (model, self.calibration_set(set_name).feeds(model))
                except GraphoptError as exc:
                    raise SuiteError(f"protocol: calibration.sets.{set_name}: {exc}") from exc
            return self._sets[key][1]
        if model.task == "embedding":
            return self.embedding_batches(model, "calibration")
        if model.task == "generic":
            return self.image_feeds(model, "calibration")
        cal = self.protocol["calibration"]
        windows = self.windows(model, cal["corpus"], "calibration", cal["windows"], cal["length"])
        return [{model.inputs[0].name: w} for w in windows]
