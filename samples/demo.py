"""The job behind `make demo`: SmolLM2 compressed to W8A8 as a decoder that generates, next to the float one.

Runs samples/recipes/smollm2-decoder-w8a8.yaml as a verified pipeline: SmolLM2 becomes a decoder
with a KV cache (ONNX Runtime's GroupQueryAttention), its residual stream and down_proj inputs are rotated, weights and
activations go to 8 bits (the 15 % least accurate activation points at 16) calibrated once, and the
linears become the integer kernels ONNX Runtime's CPU runs fastest. It prints the per-step report
(time, sizes, diff, fidelity against each step's input) and the fidelity on held-out text, writes
the float and the compressed decoder folders, and generates a reply to one prompt with each, side
by side. With a warm export cache it takes a few minutes on two CPU cores; the first run also
exports SmolLM2 (a few minutes more, cached afterwards).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.generation import Generator
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.frontends.corpora import lm_windows
from graphopt.frontends.decoder_folder import save_decoder
from graphopt.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "samples" / "recipes" / "smollm2-decoder-w8a8.yaml"
PROMPT = "Explain in two sentences why a phone app would run a language model on the device."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 128 tokens")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        run(args.out, args.windows, args.prompt, args.max_new_tokens)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(out: Path, windows: int, prompt: str, max_new_tokens: int) -> None:
    start = time.perf_counter()
    recipe = load_recipe(RECIPE)
    model = graphopt.load("sample:smollm2", decoder=recipe.decoder)
    print(f"demo: SmolLM2 loaded as a decoder in {time.perf_counter() - start:.1f} s "
          f"({model.num_params() / 1e6:.1f}M parameters)")

    result = graphopt.Pipeline(recipe.passes, verify=True).run(model, calib=recipe.calibration_feeds(model))
    print()
    print(result.report.to_markdown())
    save_decoder(model, out / "smollm2-fp32")
    save_decoder(result.model, out / "smollm2-w8a8")
    result.report.save(out / "smollm2-w8a8")
    print(f"demo: decoder folders {out / 'smollm2-fp32'} and {out / 'smollm2-w8a8'} "
          f"(`graphopt generate FOLDER --chat --prompt ...` runs either)")

    eval_windows = lm_windows(model.tokenizer, "eval", windows, 128)
    before, reference = evaluate_causal_lm(model, eval_windows)
    after, _ = evaluate_causal_lm(result.model, eval_windows, reference)
    print(f"\nfidelity on {windows} held-out windows x 128 tokens: ppl {before['ppl']:.3f} (fp32) -> "
          f"{after['ppl']:.3f} (W8A8), overlap@1 {after['overlap@1']:.4f}, overlap@8 {after['overlap@8']:.4f}")

    print(f"\nprompt (chat template): {prompt}")
    for name in ("smollm2-fp32", "smollm2-w8a8"):
        folder = out / name
        reply = Generator.load(folder, log=lambda *a: None).generate(prompt, max_new_tokens=max_new_tokens, chat=True)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))
        print(f"\n[{name}] {size / 1e6:.0f} MB, {reply.tokens_per_s:.0f} tokens/s, "
              f"first token after {reply.ttft_s * 1000:.0f} ms")
        print(reply.text.strip())
    print(f"\ndemo: done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
