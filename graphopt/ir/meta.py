"""What a Model carries beside its graph (`ModelMeta`), and how it is stored in an ONNX file: one
JSON metadata property, checked on reading before anything trusts it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphopt.errors import ModelLoadError
from graphopt.files.reading import parse_json, shown, want_dict, want_str
from graphopt.quant.encodings import EncodingError, Encodings

__all__ = ["ModelMeta", "META_KEY", "PROVENANCE_KEY", "ENCODINGS_IN_GRAPH", "MAX_META_CHARS", "check_meta"]

META_KEY = "graphopt.meta"
PROVENANCE_KEY = "graphopt.pass"
ENCODINGS_IN_GRAPH = "encodings_in_graph"  # meta JSON key: weights whose encoding is their DequantizeLinear
MAX_META_CHARS = 256 << 20  # the graphopt.meta JSON: encodings and records, never weights


@dataclass
class ModelMeta:
    """What passes learn and later passes need, keyed by tensor name.

    encodings: tensor name -> quantization encoding (a JSON-able dict in AIMET/QNN terms)
    masks:     weight name -> sparsity record ({"pattern": "2:4" | "unstructured", "ratio": ..})
    pruning:   list of records of structural removals, in the order they happened
    provenance: node name -> name of the pass that created it (stamped by the pass manager)
    extra:     anything else a pass wants to hand on (JSON-able)
    """

    encodings: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    pruning: list[dict] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_meta(model: onnx.ModelProto, path: Path) -> None:
    """The model's own `graphopt.meta` JSON: strict, bounded, each field of the type Model expects,
    its encodings valid entries."""
    props = [p for p in model.metadata_props if p.key == META_KEY]
    if not props:
        return
    where = f"{path}: metadata '{META_KEY}'"
    if len(props) > 1:
        raise ModelLoadError(f"{where} is given {len(props)} times")
    if len(props[0].value) > MAX_META_CHARS:
        raise ModelLoadError(f"{where} is {len(props[0].value):,} characters, more than {MAX_META_CHARS:,}")
    data = want_dict(parse_json(props[0].value, where=where, error=ModelLoadError), where, ModelLoadError)
    kinds = {f.name: dict if f.name != "pruning" else list for f in dataclasses.fields(ModelMeta)}
    kinds[ENCODINGS_IN_GRAPH] = list
    for key, kind in kinds.items():
        if key in data and not isinstance(data[key], kind):
            raise ModelLoadError(f"{where}: '{key}' must be a{'n object' if kind is dict else ' list'}, "
                                 f"got {shown(data[key])}")
    for name in data.get(ENCODINGS_IN_GRAPH, []):
        want_str(name, f"{where}: '{ENCODINGS_IN_GRAPH}' entry", ModelLoadError)
    for name, made_by in data.get("provenance", {}).items():
        want_str(made_by, f"{where}: provenance of node {shown(name)}", ModelLoadError)
    try:
        Encodings.from_meta(data.get("encodings", {}), f"{where}: encodings")
    except EncodingError as exc:
        raise ModelLoadError(str(exc)) from None
