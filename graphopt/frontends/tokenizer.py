"""A Hugging Face tokenizer without transformers: tokenizer.json through the tokenizers library, the chat
template rendered by jinja2 in a sandbox, as transformers renders it.

Generation reads its decoder folder's tokenizer through `Tokenizer.read`, so `graphopt generate`
never imports transformers (nor, through it, torch, which would cost ~275 MB of peak memory). It
reads, each bounded and checked before use:
- `tokenizer.json` (required: transformers' fast tokenizers write it with save_pretrained);
- `tokenizer_config.json` (optional): the special tokens (`bos_token`, `eos_token`, ...) the
  template sees, and the chat template of older folders (a string, or a list of named templates);
- `chat_template.jinja` (optional): the chat template of newer folders, which wins over the config's.

For the same files, `encode`, `render_chat` and `decode` give what transformers' `tokenizer(text)`,
`apply_chat_template(..., tokenize=False)` and `decode(ids, skip_special_tokens=True)` give; text
is not cleaned of spaces before punctuation (transformers skips that clean-up for BPE tokenizers,
the kind every Llama-family decoder has).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.files.reading import confined_path, parse_json, read_bytes, shown, want_dict
from graphopt.frontends.huggingface import MAX_TOKENIZER_BYTES

__all__ = ["Tokenizer", "TOKENIZER_FILE", "SPECIAL_TOKENS"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20
# the named special tokens transformers hands a chat template (its special_tokens_map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text to token ids and back, and a chat rendered as the model's template writes it."""

    def __init__(self, backend, chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._template = None

    @classmethod
    def read(cls, folder: str | Path) -> "Tokenizer":
        """The tokenizer of a folder (see the module docstring); ModelLoadError naming the file on
        anything missing, oversized or malformed."""
        import tokenizers

        folder = Path(folder)
        path = confined_path(folder, TOKENIZER_FILE, who=str(folder), missing=ModelLoadError)
        text = read_bytes(path, max_bytes=MAX_TOKENIZER_BYTES, error=ModelLoadError, what=TOKENIZER_FILE)
        try:
            backend = tokenizers.Tokenizer.from_str(text.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise ModelLoadError(f"{path}: not a tokenizer the tokenizers library reads: {type(exc).__name__}: "
                                 f"{shown(str(exc), 200)}") from exc
        config = _read_config(folder)
        template = _config_template(config.get("chat_template"), str(folder / CONFIG_FILE))
        if (folder / TEMPLATE_FILE).exists():
            path = confined_path(folder, TEMPLATE_FILE, who=str(folder), missing=ModelLoadError)
            template = _utf8(read_bytes(path, max_bytes=MAX_TEMPLATE_BYTES, error=ModelLoadError, what=TEMPLATE_FILE),
                             str(path))
        special = {name: _token_text(config[name], f"{folder / CONFIG_FILE}: '{name}'")
                   for name in SPECIAL_TOKENS if config.get(name) is not None}
        return cls(backend, template, special)

    @classmethod
    def of(cls, hf_tokenizer) -> "Tokenizer":
        """The same tokenizer as a transformers fast tokenizer (a Model's, when generating from a Model)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GraphoptError(f"a {type(hf_tokenizer).__name__} has no tokenizers backend (tokenizer.json); "
                                "generation needs a fast tokenizer")
        special = {name: str(value) for name, value in hf_tokenizer.special_tokens_map.items()
                   if name in SPECIAL_TOKENS and value is not None}
        return cls(backend, _config_template(hf_tokenizer.chat_template, type(hf_tokenizer).__name__), special)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special`, the special tokens the tokenizer adds (its post-processor)."""
        return list(self.backend.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """`messages` ({"role", "content"} dicts) written by the chat template, the assistant's turn
        opened after them with `add_generation_prompt`; GraphoptError without a template or when the
        template refuses the messages."""
        import jinja2

        if not self.chat_template:
            raise GraphoptError("--chat: this model's tokenizer has no chat template")
        if self._template is None:
            self._template = _sandbox().from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise GraphoptError(f"--chat: the chat template refuses the messages: {shown(str(exc), 200)}") from exc


def _sandbox():
    """A sandboxed jinja2 environment with the options, filter and globals transformers gives chat templates."""
    import jinja2.ext
    import jinja2.sandbox
    import jinja2.utils

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must keep
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() refusing underscored names, which could reach Python's internals."""

        def __init__(*args, **kwargs):  # jinja's signature: namespace(self=...) stays a name
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace)
    return env


def _read_config(folder: Path) -> dict:
    if not (folder / CONFIG_FILE).exists():
        return {}
    path = confined_path(folder, CONFIG_FILE, who=str(folder), missing=ModelLoadError)
    data = read_bytes(path, max_bytes=MAX_TOKENIZER_BYTES, error=ModelLoadError, what=CONFIG_FILE)
    return want_dict(parse_json(data, where=str(path), error=ModelLoadError), str(path), ModelLoadError)


def _config_template(value: Any, where: str) -> str | None:
    """A chat template as configs hold it: a string, or named templates (a list of {name, template}
    or a dict) of which the one named "default" is used."""
    if value is None or isinstance(value, str):
        return value
    named = value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
    if not isinstance(named, dict) or not isinstance(named.get("default"), str):
        raise ModelLoadError(f"{where}: 'chat_template' must be a string or named templates with a 'default', "
                             f"got {shown(value)}")
    return named["default"]


def _token_text(value: Any, where: str) -> str:
    """A special token as configs hold it: its text, or an AddedToken's dict with the text as 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ModelLoadError(f"{where} must be a token's text, got {shown(value)}")
    return value


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
