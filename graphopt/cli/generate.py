"""`graphopt generate MODEL_DIR --prompt ...`: generate text with a decoder folder, streamed as it comes."""

from __future__ import annotations

import argparse
import json
import sys

from graphopt.cli.command import log, register_command


def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="a decoder folder (graphopt convert with a decoder: recipe)")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    sampling.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature instead")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling: keep tokens up to P")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampler")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="onnxruntime threads (0: one per core)")
    parser.add_argument("--no-spin", action="store_true",
                        help="worker threads sleep between kernels instead of spinning (for a machine busy with other work)")
    parser.add_argument("--json", action="store_true", help="print the tokens and figures as JSON at the end")


def _generate_run(args) -> int:
    from graphopt.errors import OptionError
    from graphopt.evaluation.generation import Generator, check_sampling

    if args.top_p != 1.0 and args.temperature is None:
        raise OptionError("--top-p: sampling needs --temperature T (without it generation is greedy)")
    check_sampling(args.max_new_tokens, args.temperature or 0.0, args.top_p, args.seed)
    log(f"loading {args.model} ...")
    generator = Generator.load(args.model, threads=args.threads, spin=not args.no_spin, log=log)

    def show(token: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generator.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                                top_p=args.top_p, seed=args.seed, chat=args.chat, stream=None if args.json else show)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print()
    log(f"{len(result.tokens)} tokens ({result.stop}) after a {len(result.prompt_tokens)}-token prompt: "
        f"{result.tokens_per_s:.1f} tokens/s, time to first token {result.ttft_s * 1e3:.0f} ms, "
        f"peak memory {result.peak_rss_mib:.0f} MiB")
    return 0


register_command("generate", _generate_args, _generate_run, "generate text with a decoder folder, streamed")
