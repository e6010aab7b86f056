"""Generation from a folder with a Hugging Face tokenizer: the prompt ids and text equal transformers', and
neither `graphopt.generate` nor `graphopt generate` imports torch or transformers to get them."""

import json
import subprocess
import sys

import numpy as np
import pytest

import graphopt
from graphopt.frontends.corpora import lm_windows
from graphopt.frontends.decoder import llama_decoder
from graphopt.frontends.decoder_folder import save_decoder
from tests.decoding import tiny_hf

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPT = "The assert statement — naïve 🙂 check"


def _quiet(*_):
    pass


def _byte_bpe(text: str):
    """A transformers tokenizer of 256 ids (the tiny Llama's vocabulary): byte-level BPE trained on `text`,
    ChatML special tokens and chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(tiny Llama decoder Model with a BPE tokenizer, its folder)."""
    text = bytes(np.concatenate(lm_windows(None, "calib", 8, 256)).ravel().tolist()).decode("utf-8", "replace")
    model = llama_decoder(tiny_hf(), _byte_bpe(text), {"attention": "ort", "capacity": 96}, name="tiny-bpe",
                          log=_quiet)
    folder = tmp_path_factory.mktemp("decoder") / "tiny-bpe"
    save_decoder(model, folder, log=_quiet)
    return model, folder


_CHILD = """
import json, sys
import graphopt
from graphopt import cli
folder, prompt = sys.argv[1:3]
chat = graphopt.generate(folder, prompt, chat=True, max_new_tokens=8, threads=1).to_json()
plain = graphopt.generate(folder, prompt, max_new_tokens=8, threads=1).to_json()
code = cli.main(["generate", folder, "--prompt", prompt, "--chat", "--max-new-tokens", "8", "--threads", "1", "--json"])
print(json.dumps({"chat": chat, "plain": plain, "code": code,
                  "imported": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})}))
"""


def test_folder_generation_equals_transformers_tokenizer_without_importing_it(decoder):
    import transformers

    model, folder = decoder
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), PROMPT], capture_output=True, text=True,
                          check=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["imported"] == [] and child["code"] == 0
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    chat_text = hf.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
    assert child["chat"]["prompt_tokens"] == list(hf(chat_text, add_special_tokens=False)["input_ids"])
    assert child["plain"]["prompt_tokens"] == list(hf(PROMPT)["input_ids"])
    for result in (child["chat"], child["plain"]):
        assert result["text"] == hf.decode(result["tokens"], skip_special_tokens=True)
    # a Model carries transformers' tokenizer: generation from it encodes and picks the same
    in_process = graphopt.generate(model, PROMPT, chat=True, max_new_tokens=8, threads=1, log=_quiet)
    assert in_process.prompt_tokens == child["chat"]["prompt_tokens"] and in_process.tokens == child["chat"]["tokens"]
