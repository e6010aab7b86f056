"""Text generation with a decoder in onnxruntime: prefill, decode steps carrying the KV cache, streaming.

    result = graphopt.generate("out/", "Write a haiku about phones.", max_new_tokens=64, chat=True)
    print(result.text, result.tokens_per_s, result.ttft_s)

`Generator` holds a decoder's sessions and tokenizer (from a decoder folder or a decoder Model);
`Generator.start()` opens a cache, and `Decoding.feed(ids)` runs tokens through it (a prompt in
chunks of the spec's prefill_chunk, then one token per step), returning their logits. The cache:
- ort form (`SharedBufferCache`): one buffer of fixed length per cache tensor, bound through
  IOBinding as both past and present, as onnxruntime-genai binds them: GroupQueryAttention writes
  the new rows in place, so a step copies no cache and memory stays flat.
- portable form (`StaticCache`): the host holds the capacity's slots, chooses the slots new rows
  go to, writes the graph's present rows into them and builds the additive mask. This class is
  where KV eviction (which slots, which mask) and KV quantization (how rows are stored) plug in.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError, OptionError
from graphopt.files.reading import shown
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec, smart_mask


def session_config(spin: bool) -> dict[str, str]:
    """onnxruntime session entries of a generator. `spin`: worker threads spin between the kernels of a
    step and between steps (onnxruntime's and onnxruntime-genai's default; SmolLM2 decodes about 20 %
    faster on 2 idle cores); off, they sleep, which a machine busy with other work needs (a spinning
    thread takes a core that work wants: half the tokens/s on 2 busy cores)."""
    return {"session.intra_op.allow_spinning": "1" if spin else "0"}

# a prefill chunk's activations (its logits, [chunk, vocab]) are the largest a decoder allocates; onnxruntime's
# arena keeps them for the rest of the session unless a run asks it to shrink after
SHRINK_AFTER = {"memory.enable_memory_arena_shrinkage": "cpu:0"}

__all__ = ["generate", "Generator", "GenerationResult", "Decoding", "StaticCache", "SharedBufferCache",
           "TextStream", "sample_next", "check_sampling"]


@dataclass
class GenerationResult:
    """What one generation made and how fast: new token ids (an end-of-sequence token included),
    their text, why it stopped ("eos", "length": max_new_tokens, "capacity": the cache is full),
    time to first token (prefill + first pick), decode tokens/s (tokens after the first over their
    time) and the process's peak resident memory."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stop: str
    ttft_s: float
    tokens_per_s: float
    peak_rss_mib: float

    def to_json(self) -> dict:
        return asdict(self)


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started its program: VmHWM of
    /proc/self/status (on Linux, ru_maxrss of a process also counts what its parent held when it
    started it, so a process started by a large one would report its parent's memory)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    return peak_rss() / (1 << 20)


# more onnxruntime threads than this per core only slow a step down (each spins for a core), and
# thousands of them take minutes to start
MAX_THREADS_PER_CORE = 4


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ caches
class StaticCache:
    """The portable form's KV cache on the host: `capacity` slots per cache tensor.

    `inputs(seq)` gives a step's cache feeds (positions, additive mask, the cache arrays); after
    the step, `write(presents, count)` stores the first `count` new rows of each present output
    in the slots `slots(count)` chooses (the first free ones) and marks them visible. A key is
    stored after rotary, so a slot's place does not matter, only the mask: an eviction policy
    overrides `slots` (and frees slots in `used`), KV quantization overrides how `write` stores rows.
    """

    def __init__(self, spec: DecoderSpec):
        self.spec = spec
        shape = (1, spec.kv_heads, spec.capacity, spec.head_dim)
        self.past = {name: np.zeros(shape, spec.cache_dtype) for name in spec.past_names}
        self.used = np.zeros(spec.capacity, dtype=bool)
        self.position = 0  # position of the next token

    @property
    def room(self) -> int:
        return int(self.spec.capacity - self.used.sum())

    def slots(self, count: int) -> np.ndarray:
        free = np.flatnonzero(~self.used)
        if free.size < count:
            raise GraphoptError(f"the cache holds {self.spec.capacity} tokens; {count} more do not fit")
        return free[:count]

    def inputs(self, seq: int) -> dict[str, np.ndarray]:
        # a padded prefill chunk's rows past the last real token are never seen; keep their
        # positions inside the rotary table
        positions = np.minimum(self.position + np.arange(seq, dtype=np.int64), self.spec.capacity - 1)[None]
        mask = smart_mask(self.used, seq, self.spec.mask_value)
        return {"position_ids": positions, "attention_mask": mask, **self.past}

    def write(self, presents: list[np.ndarray], count: int) -> None:
        slots = self.slots(count)
        for name, rows in zip(self.spec.past_names, presents):
            self.past[name][:, :, slots] = rows[:, :, :count]
        self.used[slots] = True
        self.position += count


class SharedBufferCache:
    """The ort form's KV cache: one [1, kv_heads, length, head_dim] buffer of the spec's cache_dtype
    per cache tensor (int8: codes GroupQueryAttention quantizes and reads itself, see `quantize_kv`),
    bound as both past and present, so GroupQueryAttention appends the new rows in place."""

    def __init__(self, spec: DecoderSpec, length: int):
        import onnxruntime as ort

        self.spec = spec
        self.length = length
        shape = (1, spec.kv_heads, length, spec.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, spec.cache_dtype)) for _ in spec.past_names]
        self.tokens = 0
        self.ones = np.ones((1, length), np.int64)  # the mask of `tokens` held tokens is a view of it
        self.bound_to = None  # the io binding the buffers are bound to: they stay bound across steps

    @property
    def room(self) -> int:
        return self.length - self.tokens

    def bind(self, io, seq: int) -> None:
        """Bind the cache and the mask of `seq` new tokens; the tokens count as held from now."""
        self.tokens += seq
        io.bind_cpu_input("attention_mask", self.ones[:, :self.tokens])
        if self.bound_to is not io:
            for past, present, buffer in zip(self.spec.past_names, self.spec.present_names, self.buffers):
                io.bind_ortvalue_input(past, buffer)
                io.bind_ortvalue_output(present, buffer)
            self.bound_to = io


class Decoding:
    """One sequence through a decoder: `feed(ids)` runs tokens (in prefill chunks) and returns
    their logits [len(ids), vocab]; `room` is how many more tokens the cache takes."""

    def __init__(self, spec: DecoderSpec, sessions: dict[str, Any], length: int, folder: Path | None = None):
        self.spec = spec
        self.sessions = sessions
        self.folder = folder  # where the graphs came from, for errors
        if spec.form == "ort":
            self.cache = SharedBufferCache(spec, length)
            self.io = sessions["model.onnx"].io_binding()  # one binding for the sequence: the cache stays bound
        else:
            self.cache = StaticCache(spec)

    @property
    def room(self) -> int:
        return self.cache.room

    def feed(self, ids: list[int] | np.ndarray, *, last: bool = False) -> np.ndarray:
        """Run `ids` through the model (a prefill chunk at a time) into the cache; their logits
        [len(ids), vocab], or with `last` only the last token's [vocab] (a long prompt's logits
        are never held together)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab):
            bad = int(ids[(ids < 0) | (ids >= self.spec.vocab)][0])
            raise GraphoptError(f"token id {bad} is not in the model's vocabulary (ids 0 to {self.spec.vocab - 1})")
        if ids.size > self.room:
            raise GraphoptError(f"{ids.size} tokens do not fit the cache: room for {self.room} more "
                                f"(capacity {self.spec.capacity})")
        chunk = self.spec.prefill_chunk
        step = self._ort_step if self.spec.form == "ort" else self._portable_step
        parts = []
        for start in range(0, ids.size, chunk):
            logits = step(ids[start:start + chunk])
            parts = [logits[-1]] if last else parts + [logits]
        return parts[0] if last or len(parts) == 1 else np.concatenate(parts)

    def _ort_step(self, ids: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        logits = np.empty((1, ids.size, self.spec.vocab), np.float32)  # onnxruntime writes into it
        self.io.bind_cpu_input("input_ids", ids[None])
        self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.cache.bind(self.io, ids.size)
        self._run("model.onnx", ids.size, self.sessions["model.onnx"].run_with_iobinding, self.io, _run_options(ids.size))
        return logits[0]

    def _portable_step(self, ids: np.ndarray) -> np.ndarray:
        file, seq = ("decode.onnx", 1) if ids.size == 1 else ("prefill.onnx", self.spec.prefill_chunk)
        padded = np.zeros((1, seq), np.int64)
        padded[0, :ids.size] = ids
        outputs = self._run(file, ids.size, self.sessions[file].run, None, {"input_ids": padded, **self.cache.inputs(seq)},
                            _run_options(seq))
        self.cache.write(outputs[1:], ids.size)
        return outputs[0][0, :ids.size]

    def _run(self, file: str, tokens: int, run, *args):
        """`run(*args)` (a session's run of graph `file`); onnxruntime's failure (a graph that loads but
        cannot run these feeds) becomes a GraphoptError naming the graph."""
        try:
            return run(*args)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail / RuntimeException types
            where = self.folder / file if self.folder is not None else file
            raise GraphoptError(f"{where}: onnxruntime failed running a step of {tokens} token(s): "
                                f"{shown(' '.join(str(exc).split()), 300)}") from exc


def _run_options(tokens: int):
    """Run options of a step of `tokens` tokens: a prefill chunk gives its arena memory back when it
    ends (peak RSS then stays near one chunk's need); a decode step keeps it, for speed."""
    if tokens == 1:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    for key, value in SHRINK_AFTER.items():
        options.add_run_config_entry(key, value)
    return options


# ------------------------------------------------------------------------------ sampling
def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """The next token: argmax when `temperature` is 0 (the first index among ties, as torch does),
    else a draw from softmax(logits / temperature) cut to the smallest set of tokens whose
    probability reaches `top_p`. Logits holding NaN or infinity are refused (GraphoptError): no
    token could be chosen from them honestly."""
    top = float(logits.max())  # NaN when any logit is
    if not math.isfinite(top):
        raise GraphoptError(f"the decoder's 'logits' hold {'NaN' if top != top else 'infinity'}: its weights or graph "
                            "are broken (a NaN or infinite weight?)")
    if temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature sends the others to -inf: probability 0
        probs = np.exp((logits.astype(np.float64) - top) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = order[:int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


class TextStream:
    """Text of a growing token list, handed out piece by piece: a piece is held back while it ends
    inside a multi-byte character (the decoder shows it as U+FFFD)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


# ---------------------------------------------------------------------------- generator
class Generator:
    """A decoder's sessions and tokenizer (a `graphopt.frontends.tokenizer.Tokenizer`, None when the
    model reads bytes), ready to generate (see the module docstring)."""

    def __init__(self, spec: DecoderSpec, graphs, tokenizer=None, *, threads: int = 0, spin: bool = True,
                 folder: Path | None = None):
        most = MAX_THREADS_PER_CORE * _cores()
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= most:
            raise OptionError(f"threads must be an integer in [0, {most}] (0: one per core; at most "
                              f"{MAX_THREADS_PER_CORE} per core of the {_cores()} here), got {shown(threads)}")
        self.spec = spec
        self.tokenizer = tokenizer
        self.sessions = graphs.sessions(threads, config=session_config(spin))
        self.folder = folder

    @classmethod
    def load(cls, source: "str | Path | Model | Generator", *, threads: int = 0, spin: bool = True,
             log=print) -> "Generator":
        """A generator for a decoder folder, a decoder Model (FX form: lowered) or a Generator itself
        (`threads`: onnxruntime's intra-op threads, 0 one per core; `spin`: see `session_config`)."""
        if isinstance(source, Generator):
            return source
        from graphopt.lowering.decoder import DecoderGraphs

        if isinstance(source, Model):
            from graphopt.frontends.tokenizer import Tokenizer

            graphs = DecoderGraphs.of(source, log=log)
            tokenizer = Tokenizer.of(source.tokenizer) if source.tokenizer is not None else None
            return cls(graphs.spec, graphs, tokenizer, threads=threads, spin=spin)
        from graphopt.frontends.decoder_folder import is_decoder_folder, read_decoder_folder

        path = Path(source)
        if not is_decoder_folder(path):
            raise GraphoptError(f"{path}: not a decoder folder (no decoder.json); write one with `graphopt convert "
                                "MODEL --recipe R -o OUT` and a recipe with a decoder: section")
        folder = read_decoder_folder(path)
        return cls(folder.spec, folder.graphs, folder.tokenizer, threads=threads, spin=spin, folder=path)

    def start(self, length: int | None = None) -> Decoding:
        """A new sequence whose cache takes `length` tokens (at most, and by default, the capacity)."""
        length = min(length or self.spec.capacity, self.spec.capacity)
        return Decoding(self.spec, self.sessions, length, self.folder)

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Token ids of `prompt`; with `chat`, of the tokenizer's chat template around it as a user turn."""
        if self.tokenizer is None:
            if chat:
                raise GraphoptError("--chat: this model reads bytes and has no chat template")
            return list(prompt.encode("utf-8"))
        if chat:
            text = self.tokenizer.render_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, special=False)
        return self.tokenizer.encode(prompt)

    def _prompt_ids(self, prompt: str | list[int], chat: bool) -> list[int]:
        """`prompt`'s token ids: text is encoded (GraphoptError on text that is not valid Unicode),
        a sequence of integers taken as it is (their range is checked when they are fed)."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise GraphoptError(f"the prompt is not valid Unicode text ({exc.reason} at character {exc.start})") from exc
            return self.encode(prompt, chat=chat)
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            return [int(t) for t in prompt]
        raise GraphoptError(f"the prompt must be text or a list of token ids, got {type(prompt).__name__}")

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(tokens)

    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 stream: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt` (text, or token ids as they are) and stop at
        an end-of-sequence token or a full cache; `stream(token, text_piece)` sees each token as it
        comes. Greedy when `temperature` is 0, else sampled (top_p, seeded by `seed`)."""
        check_sampling(max_new_tokens, temperature, top_p, seed)
        ids = self._prompt_ids(prompt, chat)
        if not ids:
            raise GraphoptError("the prompt has no tokens")
        if len(ids) > self.spec.capacity:
            raise GraphoptError(f"the prompt has {len(ids)} tokens, more than the decoder's capacity of "
                                f"{self.spec.capacity}; shorten it or build the decoder with a larger capacity")
        rng = np.random.default_rng(seed) if temperature else None
        text = TextStream(self.decode)
        decoding = self.start(len(ids) + max_new_tokens)
        start = time.perf_counter()
        logits = decoding.feed(ids, last=True)
        tokens, stop, first = [], "length", 0.0
        while True:
            token = sample_next(logits, temperature, top_p, rng)
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
            piece = text.push(token)
            if stream is not None:
                stream(token, piece)
            if token in self.spec.eos_token_ids:
                stop = "eos"
                break
            if len(tokens) == max_new_tokens:
                break
            if decoding.room == 0:
                stop = "capacity"
                break
            logits = decoding.feed([token], last=True)
        end = time.perf_counter()
        rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0
        return GenerationResult(prompt_tokens=ids, tokens=tokens, text=self.decode(tokens), stop=stop,
                                ttft_s=first - start, tokens_per_s=rate, peak_rss_mib=peak_rss_mib())


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    """OptionError unless max_new_tokens >= 1, temperature >= 0 (finite), 0 < top_p <= 1 and the
    seed is None or an integer >= 0."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise OptionError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise OptionError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise OptionError(f"seed must be an integer >= 0, got {seed!r}")


def generate(model: "str | Path | Model | Generator", prompt: str | list[int], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
             stream: Callable[[int, str], None] | None = None, threads: int = 0, spin: bool = True,
             log=print) -> GenerationResult:
    """Generate text with a decoder folder, a decoder Model or a Generator (see `Generator.generate`).

    Building the sessions takes seconds for a real model: for many prompts, make a
    `Generator.load(...)` once and pass it here (or call its `generate`).
    """
    generator = Generator.load(model, threads=threads, spin=spin, log=log)
    return generator.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, chat=chat, stream=stream)
