"""The ``qzo`` command: ``train``, ``recipes``, ``chat``, ``plan``, ``export``, ``eval``, ``plot``, ``cache``.

Errors a user can fix (:class:`qzo.errors.QzoError`) print as one ``error:`` line and exit
with status 2; a NaN/inf loss exits with status 3 after saying which step and which
checkpoint is kept.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CHOICES_HELP
from .errors import NonFiniteLossError, QzoError
from .strategies import STRATEGIES

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qzo", description="Zeroth-order fine-tuning of 4/8-bit quantized LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train LoRA adapters with ZO steps (no CONFIG: the CPU demo)")
    t.add_argument("config", nargs="?",
                   help="a YAML file or a shipped recipe's name (qzo recipes lists them, e.g. "
                        "llama-3.1-8b-instruct/gpu-24gib); omitted: the CPU demo recipe")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=2e-4 (repeatable)")
    t.add_argument("--resume", metavar="RUN", help="continue a run directory from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    sub.add_parser("recipes", help="list the shipped recipes: name, model, card (run one with qzo train NAME)")

    c = sub.add_parser("chat", help="chat with a run (base + adapter) or a model")
    c.add_argument("source", help="a run directory, or a model source (folder, .gguf, smollm2-135m)")
    c.add_argument("--prompt", help="one-shot: answer this prompt and exit")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--checkpoint", default="last", help=f"for a run: {CHOICES_HELP}")

    pl = sub.add_parser("plan", help="expected peak memory of a ZO step, from the config alone (no weights read)")
    pl.add_argument("model", help="a preset (llama-2-7b, llama-3.1-8b, ...), a model folder, a .gguf or a hub id "
                                  "whose config.json is in the local Hugging Face cache")
    pl.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    pl.add_argument("--gpu", help="GPU budget, e.g. 8GiB")
    pl.add_argument("--batch", type=int, default=8)
    pl.add_argument("--seq", type=int, default=512)
    pl.add_argument("--lora-r", type=int, default=8)
    pl.add_argument("--rule", default="sgd", choices=["sgd", "momentum", "adam", "sign"])
    pl.add_argument("--strategy", default="spsa", choices=list(STRATEGIES))
    pl.add_argument("--pool", type=int, default=1, help="candidates per stacked forward (optim.batched)")
    pl.add_argument("--double-quant", action="store_true")
    pl.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated decoder linears with LoRA")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="compute dtype of activations and unquantized weights")

    e = sub.add_parser("export", help="a run's trained values as a PEFT adapter, a merged model, a 4-bit folder or a GGUF")
    e.add_argument("run", help="a run directory written by qzo train")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--peft", dest="fmt", action="store_const", const="peft",
                     help="LoRA adapter folder for peft.PeftModel.from_pretrained (LoRA-only runs)")
    fmt.add_argument("--merged", dest="fmt", action="store_const", const="merged",
                     help="plain transformers model (safetensors) with adapters, scales and slices folded in")
    fmt.add_argument("--quantized", dest="fmt", action="store_const", const="quantized",
                     help="bitsandbytes 4-bit folder with the trained scales (+ adapter/ for LoRA runs)")
    fmt.add_argument("--gguf", dest="fmt", action="store_const", const="gguf",
                     help="merged model as one GGUF file for llama.cpp and Ollama, with a Modelfile beside it")
    fmt.add_argument("--gguf-lora", dest="fmt", action="store_const", const="gguf-lora",
                     help="LoRA adapter GGUF for the base's GGUF (llama.cpp --lora, Ollama ADAPTER; LoRA-only runs)")
    e.add_argument("--out", help="destination folder (must not exist); default RUN/export-FORMAT "
                                 "(RUN/export-gguf-TYPE for --gguf)")
    e.add_argument("--base", help="the base model's new place, if it moved since training")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="--merged: weight dtype (float32 keeps the merge exact)")
    e.add_argument("--type", dest="gguf_type", choices=["f16", "q8_0"],
                   help="--gguf: f16 (default; matrices in float16) or q8_0 (llama.cpp's 8-bit blocks)")
    e.add_argument("--checkpoint", default="last", help=CHOICES_HELP)

    ev = sub.add_parser("eval", help="held-out loss/perplexity and sample replies: base model vs a run's checkpoint")
    ev.add_argument("run", help="a run directory written by qzo train")
    ev.add_argument("--samples", type=int, default=4, help="held-out prompts to answer with both models (0: none)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy reply per sample")
    ev.add_argument("--checkpoint", default="last", help=CHOICES_HELP)

    pt = sub.add_parser("plot", help="PNG of training and held-out loss against forward passes (needs matplotlib)")
    pt.add_argument("runs", nargs="+", metavar="RUN", help="one or more run directories, overlaid")
    pt.add_argument("--out", help="PNG to write; default RUN/loss.png for one run, loss-compare.png for several")

    k = sub.add_parser("cache", help="show or clear qzo's cache of converted models")
    k.add_argument("--clear", action="store_true", help="delete every cached conversion")
    return p


def _train(args) -> int:
    from .trainer import train

    # With no CONFIG the built-in defaults run: they are the demo recipe (the shipped recipe
    # smollm2-135m/demo spells them out; a test keeps the two equal). CONFIG is a YAML file or
    # a shipped recipe's name (qzo.recipes).
    summary = train(args.config, args.overrides, args.resume, progress=not args.no_progress)
    stopped = summary.get("stopped_by", "")
    if stopped.endswith(" received"):  # SIGINT / SIGTERM at a step boundary: the shell's 128 + signal number
        import signal

        return 128 + int(signal.Signals[stopped.split()[0]])
    return 0


def _recipes(args) -> int:
    from .recipes import table

    print(table())
    return 0


def _chat(args) -> int:
    from .chat import chat_loop, load_for_chat, reply

    model, tok = load_for_chat(args.source, args.checkpoint)
    if args.prompt is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        reply(model, tok, messages, args.max_new_tokens, stream=sys.stdout)
        sys.stdout.write("\n")
        return 0
    chat_loop(model, tok, args.max_new_tokens, args.system)
    return 0


def _plan(args) -> int:
    from .plan import plan

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    result = plan(args.model, quant=args.quant, gpu=args.gpu, batch=args.batch, seq=args.seq, lora_r=args.lora_r,
                  lora_targets=targets, rule=args.rule, strategy=args.strategy, pool=args.pool,
                  double_quant=args.double_quant, dtype=args.dtype)
    pool = f", pool {args.pool} stacked" if args.pool > 1 else ""
    print(f"{args.model}, {args.quant}, batch {args.batch} x {args.seq}{pool}, LoRA r {args.lora_r} on "
          f"{','.join(targets)}, {args.dtype}")
    print(result.table())
    return 0


def _export(args) -> int:
    from .export import export

    if args.gguf_type is not None and args.fmt != "gguf":
        raise QzoError(f"--type {args.gguf_type} is the GGUF type and goes with --gguf (for --{args.fmt}, --dtype "
                       "sets the weight dtype)")
    export(args.run, args.fmt, out=args.out, base=args.base, dtype=args.dtype, checkpoint=args.checkpoint,
           gguf_type=args.gguf_type or "f16")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    evaluate_run(args.run, samples=args.samples, max_new_tokens=args.max_new_tokens, checkpoint=args.checkpoint)
    return 0


def _plot(args) -> int:
    from .plot import plot_runs

    print(plot_runs(args.runs, args.out))
    return 0


def _cache(args) -> int:
    from .cache import cache_dir, clear_cache

    if args.clear:
        freed = clear_cache()
        print(f"cleared {cache_dir()} ({freed / 2**20:.1f} MiB)")
    else:
        print(cache_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "recipes": _recipes, "chat": _chat, "plan": _plan, "export": _export,
                "eval": _eval, "plot": _plot, "cache": _cache}
    try:
        return handlers[args.command](args)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except QzoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
