"""A Hugging Face tokenizer without transformers: tokenizer.json through the tokenizers library, the chat
template rendered by jinja2 in a sandbox, as transformers renders it.

Generation reads its decoder folder's tokenizer through `Tokenizer.read`, so `graphopt generate`
never imports transformers (nor, through it, torch, which would cost ~275 MB of peak memory). It
reads, each bounded and checked before use:
- `tokenizer.json` (required: transformers' fast tokenizers write it with save_pretrained);
- `tokenizer_config.json` (optional): the special tokens (`bos_token`, `eos_token`, ...) the
  template sees, and the chat template of older folders (a string, or a list of named templates);
- `chat_template.jinja` (optional): the chat template of newer folders, which wins over the config's.

A chat template is code from the model's folder: it renders in jinja2's immutable sandbox (as in
transformers), held to MAX_TEMPLATE_STEPS lines run and MAX_CHAT_CHARS characters built, so a template
that loops for hours or would fill memory is refused by name, like one that raises.

For the same files, `encode`, `render_chat` and `decode` give what transformers' `tokenizer(text)`,
`apply_chat_template(..., tokenize=False)` and `decode(ids, skip_special_tokens=True)` give; text
is not cleaned of spaces before punctuation (transformers skips that clean-up for BPE tokenizers,
the kind every Llama-family decoder has).
"""

from __future__ import annotations

import functools
import json
import re
import sys
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
# a chat template is code from the model's folder: what one render may build and how long it may run
MAX_CHAT_CHARS = 1 << 20  # characters of the rendered chat, and of any string or list the template makes
MAX_TEMPLATE_STEPS = 1_000_000  # lines of template code one render runs (a real template runs a few hundred)
MAX_INT_BITS = 1 << 16  # bits of an integer a template computes
# the named special tokens transformers hands a chat template (its special_tokens_map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text to token ids and back, and a chat rendered as the model's template writes it."""

    def __init__(self, backend, chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 template_where: str = "the chat template"):
        self.backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.template_where = template_where  # the file the template came from, for errors
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
        where = str(folder / CONFIG_FILE)
        if (folder / TEMPLATE_FILE).exists():
            path = confined_path(folder, TEMPLATE_FILE, who=str(folder), missing=ModelLoadError)
            template = _utf8(read_bytes(path, max_bytes=MAX_TEMPLATE_BYTES, error=ModelLoadError, what=TEMPLATE_FILE),
                             str(path))
            where = str(folder / TEMPLATE_FILE)
        special = {name: _token_text(config[name], f"{folder / CONFIG_FILE}: '{name}'")
                   for name in SPECIAL_TOKENS if config.get(name) is not None}
        return cls(backend, template, special, where)

    @classmethod
    def of(cls, hf_tokenizer) -> "Tokenizer":
        """The same tokenizer as a transformers fast tokenizer (a Model's, when generating from a Model)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GraphoptError(f"a {type(hf_tokenizer).__name__} has no tokenizers backend (tokenizer.json); "
                                "generation needs a fast tokenizer")
        special = {name: str(value) for name, value in hf_tokenizer.special_tokens_map.items()
                   if name in SPECIAL_TOKENS and value is not None}
        where = f"transformers' {type(hf_tokenizer).__name__}"
        return cls(backend, _config_template(hf_tokenizer.chat_template, where), special, where)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special`, the special tokens the tokenizer adds (its post-processor)."""
        return list(self.backend.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """`messages` ({"role", "content"} dicts) written by the chat template, the assistant's turn
        opened after them with `add_generation_prompt`. GraphoptError naming the template's file
        without a template, when it does not compile, or when it refuses the messages, fails, runs
        more than MAX_TEMPLATE_STEPS lines or builds more than MAX_CHAT_CHARS characters (see `_sandbox`
        and `_render_bounded`)."""
        import jinja2

        if not self.chat_template:
            raise GraphoptError(f"--chat: this model's tokenizer has no chat template ({self.template_where} holds none)")
        if self._template is None:
            try:
                self._template = _sandbox().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise GraphoptError(f"--chat: {self.template_where}: not a valid template (line {exc.lineno}: "
                                    f"{shown(exc.message, 200)})") from None
        context = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                       **self.special_tokens)
        try:
            return _render_bounded(self._template, context)
        except Exception as exc:  # noqa: BLE001 - a template can raise anything: a bound, its own error, Python's
            known = isinstance(exc, (jinja2.TemplateError, _TemplateBound))
            reason = shown(str(exc), 200) if known else f"{type(exc).__name__}: {shown(str(exc), 200)}"
            raise GraphoptError(f"--chat: {self.template_where}: the chat template refuses the messages: {reason}") from None


class _TemplateBound(Exception):
    """A chat template went past MAX_TEMPLATE_STEPS or MAX_CHAT_CHARS."""


def _chars(value: Any) -> int:
    """About how many characters `value` prints as: a string's length, a list's, tuple's or dict's items
    counted through; the count stops soon after passing MAX_CHAT_CHARS."""
    total, stack = 0, [value]
    while stack and total <= MAX_CHAT_CHARS:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, dict)):
            total += 2 + len(item)
            stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
        else:
            total += 8
    return total


def _length(count: int) -> None:
    if count > MAX_CHAT_CHARS:
        raise _TemplateBound(f"a value of {count:,} characters, more than {MAX_CHAT_CHARS:,}")


def _sized(value: Any) -> Any:
    """`value`, refused when it prints as more than MAX_CHAT_CHARS characters or is an integer of more than
    MAX_INT_BITS bits."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _TemplateBound(f"an integer of {value.bit_length():,} bits")
    if isinstance(value, (str, list, tuple, dict)):
        _length(_chars(value))
    return value


def _small_ints(values) -> None:
    """Refuse integer arguments past MAX_CHAT_CHARS (a width or a count: 'x'.ljust(10**9), center(10**9))."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHAT_CHARS:
            raise _TemplateBound(f"the argument {shown(value)} is larger than {MAX_CHAT_CHARS:,}")


def _formatted(form: Any, args: Any) -> None:
    """Refuse `form % args` or `form.format(*args)` when it would print past MAX_CHAT_CHARS: a width past it
    ('%999999999d', '{:>999999999}'), or every field filled with the largest argument."""
    if not isinstance(form, str):
        return
    if any(int(n) > MAX_CHAT_CHARS for n in re.findall(r"\d{7,}", form)):
        raise _TemplateBound(f"the format {shown(form)} asks for a width larger than {MAX_CHAT_CHARS:,}")
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    _small_ints(values)
    fields = form.count("%") + form.count("{")
    _length(len(form) + fields * max(map(_chars, values), default=0))


# result sizes of the str methods (and the filters doing the same) that can multiply their input, before they run
_STR_GROWTH = {
    "replace": lambda s, a: len(s) + (s.count(a[0]) if a[0] else len(s) + 1) * _chars(a[1]),
    "join": lambda s, a: _chars(a[0]) + len(s) * len(a[0]),
    "expandtabs": lambda s, a: len(s) + s.count("\t") * (a[0] if a else 8),
}


def _str_call(method: str, text: str, args: tuple) -> tuple:
    """`args` of `text.method(*args)`, an iterable to join made a list, after refusing a result past MAX_CHAT_CHARS."""
    if method == "join" and args and not isinstance(args[0], (str, list, tuple)):
        args = (list(args[0]), *args[1:])
    try:
        grown = _STR_GROWTH[method](text, args)
    except (KeyError, IndexError, TypeError, AttributeError):  # another method, or arguments str refuses itself
        return args
    _length(grown)
    return args


def _sandbox():
    """A sandboxed jinja2 environment with the options, filter and globals transformers gives chat templates,
    whose operators, calls, filters and namespaces refuse to build a string, list or integer past the bounds
    before building it (`'x' * 10**9` fails at once instead of filling memory)."""
    import jinja2
    import jinja2.ext
    import jinja2.filters
    import jinja2.sandbox
    import jinja2.utils

    class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    max(abs(left).bit_length(), 1) * right > MAX_INT_BITS:
                raise _TemplateBound(f"{shown(left)} ** {shown(right)} has too many digits")
            if operator == "*":
                sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    _length(_chars(sequence) * count)
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _length(_chars(left) + _chars(right))
            if operator == "%":
                _formatted(left, right)
            return _sized(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
            _small_ints((*args, *kwargs.values()))
            text = getattr(__obj, "__self__", None)
            if isinstance(text, str):
                args = _str_call(getattr(__obj, "__name__", ""), text, args)
            return _sized(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None

            def bounded(*args, **kwargs):
                _formatted(value.__self__, args[0] if value.__name__ == "format_map" and args else (*args, kwargs))
                return _sized(wrapper(*args, **kwargs))

            return bounded

    def bounded_filter(function):
        """A filter with its arguments after the value held to the bounds, and its result (jinja's
        pass_context / pass_eval_context marks kept)."""

        @functools.wraps(function)
        def bounded(*args, **kwargs):
            _small_ints((*args[1:], *kwargs.values()))
            return _sized(function(*args, **kwargs))

        return bounded

    @jinja2.pass_eval_context
    def join(eval_ctx, value, d="", attribute=None):
        value = value if isinstance(value, (str, list, tuple)) else list(value)
        _str_call("join", str(d), (value,))
        return jinja2.filters.sync_do_join(eval_ctx, value, d, attribute)

    @jinja2.pass_eval_context
    def replace(eval_ctx, s, old, new, count=None):
        _str_call("replace", str(s), (old, new))
        return jinja2.filters.do_replace(eval_ctx, s, old, new, count)

    def indent(s, width=4, first=False, blank=False):
        _length(len(str(s)) + (str(s).count("\n") + 1) * (len(width) if isinstance(width, str) else width))
        return jinja2.filters.do_indent(s, width, first, blank)

    def format_filter(value, *args, **kwargs):
        _formatted(value, kwargs or args)
        return jinja2.filters.do_format(value, *args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must keep
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() refusing underscored names, which could reach Python's internals, and values
        past the bounds."""

        def __init__(*args, **kwargs):  # jinja's signature: namespace(self=...) stays a name
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name, value in attrs.items():
                Namespace.check(name, value)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name, value)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")
            _sized(value)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters.update(tojson=tojson, format=format_filter, join=join, replace=replace, indent=indent)
    env.filters = {name: bounded_filter(function) for name, function in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace)
    return env


def _render_bounded(template, context: dict) -> str:
    """`template` rendered with `context`, each yielded piece and the whole held to MAX_CHAT_CHARS, and the
    template's own lines (its loops and macros: code compiled from "<template>") counted by a trace function
    up to MAX_TEMPLATE_STEPS, its variables checked as they change; any other tracer (a debugger, coverage)
    is put back after."""
    steps = 0

    def in_template(frame, event, arg):
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_TEMPLATE_STEPS:
                raise _TemplateBound(f"it ran more than {MAX_TEMPLATE_STEPS:,} steps")
            for value in frame.f_locals.values():  # a string doubled line by line ({% set s = s ~ s %})
                if isinstance(value, str):
                    _length(len(value))
        return in_template

    def trace(frame, event, arg):
        return in_template if frame.f_code.co_filename == "<template>" else None

    pieces, total = [], 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for piece in template.generate(**context):
            total += len(piece)
            _length(total)
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


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
