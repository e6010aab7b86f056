"""The tokenizer generation reads without transformers: SmolLM2's ids, chat text and decoded text equal
transformers' for the files `graphopt convert` writes; templates get transformers' globals; bad folders are refused."""

import json
import shutil

import pytest

from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.frontends.tokenizer import Tokenizer

PROMPTS = [
    "Write a haiku about phones.",
    "héllo wörld — naïve façade, 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, العربية",
    "  leading spaces\n\ttabs\r\nand\n\nnewlines  ",
    "",
    "<|im_start|>user\ntext that spells special tokens<|im_end|>",
    "{{ not a template }} {% raw %} <b>&amp;</b> 'quotes' \"double\"",
]
# a multi-line template: its output depends on trim_blocks / lstrip_blocks, tojson (transformers'
# keeps '<' and non-ASCII as they are), namespace(), raise_exception and the special tokens
TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
{{ bos_token }}{{ message['role'] }} {{ ns.turns }}
{{ message['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
{{ bos_token }}assistant
{% endif %}"""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(folder, transformers' tokenizer read from it): SmolLM2's tokenizer saved as convert saves it."""
    import transformers

    from graphopt.frontends import samples

    gguf = samples.smollm2_gguf()
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def _hf_chat_ids(hf, messages):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, list(hf(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_ids_chat_and_text_equal_transformers(smollm2, prompt):
    folder, hf = smollm2
    ours = Tokenizer.read(folder)
    assert ours.encode(prompt) == list(hf(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}]
    text, ids = _hf_chat_ids(hf, messages)
    assert ours.render_chat(messages) == text and ours.encode(text, special=False) == ids
    # special tokens (0-2) and the first byte-level pieces of an emoji left out or shown as transformers shows them
    shown = ids + [2, 0, 1] + list(hf("🙂")["input_ids"])[:1]
    assert ours.decode(shown) == hf.decode(shown, skip_special_tokens=True)


def test_a_transformers_tokenizer_converts_to_the_same_tokenizer(smollm2):
    folder, hf = smollm2
    ours, converted = Tokenizer.read(folder), Tokenizer.of(hf)
    assert converted.chat_template == ours.chat_template and converted.special_tokens == ours.special_tokens
    assert converted.encode(PROMPTS[1]) == ours.encode(PROMPTS[1])


def test_templates_get_transformers_options_and_globals(smollm2, tmp_path):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(smollm2[0])
    hf.chat_template = TEMPLATE
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.read(tmp_path)
    messages = [{"role": "system", "content": "Be <brief> & kind."}, {"role": "user", "content": PROMPTS[1]}]
    text, ids = _hf_chat_ids(hf, messages)
    assert ours.render_chat(messages) == text and ours.encode(text, special=False) == ids
    assert ours.render_chat(messages, add_generation_prompt=False) == hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(GraphoptError, match="unknown role: tool"):
        ours.render_chat([{"role": "tool", "content": "{}"}])


def test_older_folders_keep_the_template_in_the_config(smollm2, tmp_path):
    folder, hf = smollm2
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"chat_template": [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "x"}],
              "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.read(tmp_path)
    assert ours.chat_template == TEMPLATE
    assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert ours.render_chat([{"role": "user", "content": "hi"}]) == '<|im_start|>user 1\n"hi"<|im_end|>\n<|im_start|>assistant\n'


def _render(ours, template):
    ours.chat_template, ours._template = template, None
    return ours.render_chat([{"role": "user", "content": "hi"}])


def test_templates_cannot_reach_python_internals_or_change_the_messages(smollm2):
    ours = Tokenizer.read(smollm2[0])
    for template, refusal in [("{{ ''.__class__.__mro__ }}", "attribute '__class__' of 'str' object is unsafe"),
                              ("{{ messages.append(1) }}", "attribute 'append' of 'list' object is unsafe"),
                              ("{% set ns = namespace() %}{% set ns._x = 1 %}", "may not set '_x' on a namespace")]:
        with pytest.raises(GraphoptError, match=f"chat template refuses the messages: .*{refusal}"):
            _render(ours, template)
    assert _render(ours, "{{ messages.__class__ }}{{ dict.__class__ }}") == ""


def test_bad_folders_are_refused_naming_the_file(smollm2, tmp_path):
    with pytest.raises(ModelLoadError, match=r"'tokenizer.json' is missing \(looked in"):
        Tokenizer.read(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(ModelLoadError, match="tokenizer.json: not a tokenizer the tokenizers library reads"):
        Tokenizer.read(tmp_path)
    shutil.copy(smollm2[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "tool_use", "template": "x"}]}')
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: 'chat_template' must be"):
        Tokenizer.read(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: 'eos_token' must be a token's text"):
        Tokenizer.read(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(GraphoptError, match="no chat template"):
        Tokenizer.read(tmp_path).render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, refusal", [
    ("{% for x in %}", r"not a valid template \(line 1: .*Expected an expression"),
    ("{{ 1 / 0 }}", "refuses the messages: ZeroDivisionError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "refuses the messages: RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran more than 1,000,000 steps"),
    ("{{ 'x' * 10**9 }}", "a value of 1,000,000,000 characters"),
    ("{% set s = 'x' * 1024 %}" + "{% set s = s ~ s %}" * 12, "a value of 2,097,152 characters"),
    ("{{ 'x'|center(10**9) }}", "the argument 1000000000 is larger"),
    ("{{ '{:>999999999}'.format(1) }}", "asks for a width larger"),
    ("{{ range(100000)|map('string')|join('x' * 100000) }}", r"a value of [\d,]+ characters, more than"),
])
def test_templates_that_fail_loop_or_grow_without_bound_are_named_errors(smollm2, template, refusal):
    """A chat template is code from the model's folder: whatever it raises, a loop that would run for hours
    and a value that would fill memory are refused (before it is built) by a GraphoptError naming its file."""
    with pytest.raises(GraphoptError, match=rf"--chat: .*(chat_template.jinja|tokenizer_config.json).*{refusal}"):
        _render(Tokenizer.read(smollm2[0]), template)


def test_bounded_templates_still_format_join_replace_and_indent(smollm2):
    template = ("{{ '{}-{}'.format('a', 'b') }} {{ '%s=%d' % ('n', 3) }} {{ 'a b'|replace('a', 'c') }} "
                "{{ [1, 2]|join(',') }} {{ 'x\ny'|indent(2) }} {{ '+'.join(['b', 'c']) }} {{ 'ab' * 2 }}")
    assert _render(Tokenizer.read(smollm2[0]), template) == "a-b n=3 c b 1,2 x\n  y b+c abab"
