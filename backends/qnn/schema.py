"""The AIMET/QNN 1.0.0 encodings layout, checked entry by entry."""

from __future__ import annotations

_V1_TOP = {"version", "activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"}
_V1_ENTRY = {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset", "block_size", "axis"}


def check_encodings_v1(data) -> list[str]:
    """Problems with an AIMET/QNN 1.0.0 encodings document (empty when it is valid).

    The layout: {"version": "1.0.0", "activation_encodings": [entry], "param_encodings": [entry]}
    with entry = {name, dtype: INT|FLOAT, enc_type: PER_TENSOR|PER_CHANNEL|PER_BLOCK, bw,
    is_sym, scale: [float > 0], offset: [int]} (+ block_size for PER_BLOCK; `axis` is graphopt's
    extension). Names are unique across both lists.
    """
    if not isinstance(data, dict):
        return ["top level: must be an object"]
    problems = [f"top level: unknown key '{k}'" for k in sorted(set(data) - _V1_TOP)]
    if data.get("version") != "1.0.0":
        problems.append(f"version: must be \"1.0.0\", got {data.get('version')!r}")
    seen: set[str] = set()
    for section in ("activation_encodings", "param_encodings"):
        entries = data.get(section)
        if not isinstance(entries, list):
            problems.append(f"{section}: must be a list")
            continue
        for i, entry in enumerate(entries):
            problems += _check_v1_entry(entry, f"{section}[{i}]", seen)
    return problems


def _check_v1_entry(entry, where: str, seen: set[str]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be an object"]
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        return [f"{where}: 'name' must be a non-empty string"]
    where = f"{where} '{name}'"
    problems = [f"{where}: unknown key '{k}'" for k in sorted(set(entry) - _V1_ENTRY)]
    if name in seen:
        problems.append(f"{where}: name appears twice")
    seen.add(name)
    dtype, enc_type, bw = entry.get("dtype"), entry.get("enc_type"), entry.get("bw")
    if dtype not in ("INT", "FLOAT"):
        problems.append(f"{where}: dtype must be INT or FLOAT, got {dtype!r}")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"):
        problems.append(f"{where}: enc_type must be PER_TENSOR, PER_CHANNEL or PER_BLOCK, got {enc_type!r}")
    if not isinstance(bw, int) or isinstance(bw, bool) or bw not in (4, 8, 16, 32):
        problems.append(f"{where}: bw must be 4, 8, 16 or 32, got {bw!r}")
    if dtype != "INT":
        return problems
    scale, offset = entry.get("scale"), entry.get("offset")
    if not isinstance(entry.get("is_sym"), bool):
        problems.append(f"{where}: is_sym must be true or false")
    if not isinstance(scale, list) or not scale or not all(isinstance(s, (int, float)) and s > 0 for s in scale):
        problems.append(f"{where}: scale must be a non-empty list of positive numbers")
        return problems
    if not isinstance(offset, list) or len(offset) != len(scale) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offset):
        problems.append(f"{where}: offset must be a list of integers, one per scale")
    if enc_type == "PER_TENSOR" and len(scale) != 1:
        problems.append(f"{where}: PER_TENSOR has exactly one scale, got {len(scale)}")
    if enc_type == "PER_BLOCK" and not (isinstance(entry.get("block_size"), int) and entry["block_size"] > 1):
        problems.append(f"{where}: PER_BLOCK needs an integer block_size > 1")
    return problems
