"""The ``qzo`` command: ``train``, ``recipes``, ``chat``, ``plan``, ``export``, ``eval``, ``plot``, ``cache``.

Errors a user can fix (:class:`qzo.errors.QzoError`) print as one ``error:`` line and exit
with status 2; a NaN/inf loss exits with status 3 after saying which step and which
checkpoint is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NonFiniteLossError, QzoError
from ..models.bnb import QUANTS
from ..runs.checkpoint import CHOICES_HELP
from ..zo.rules import RULES
from ..zo.strategies import STRATEGIES


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
    c.add_argument("--checkpoint", help=f"for a run: {CHOICES_HELP}")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sample at this temperature")
    c.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0: nucleus sampling's probability "
                   "mass (default 1: no cut)")
    c.add_argument("--seed", type=int, help="seed of the sampling: the same seed, the same replies")

    pl = sub.add_parser("plan", help="expected peak memory of a ZO step, from the config alone (no weights read)")
    pl.add_argument("model", help="a recipe YAML or a shipped recipe's name (its model, batch, length, LoRA, "
                                  "strategy, pool, quant and dtype; flags override them), a preset (llama-2-7b, "
                                  "llama-3.1-8b, ...), a model folder, a .gguf or a hub id whose config.json is in the "
                                  "local Hugging Face cache")
    pl.add_argument("--quant", choices=list(QUANTS), help="default nf4")
    pl.add_argument("--gpu", help="GPU budget, e.g. 8GiB (a shipped GPU recipe: its card)")
    pl.add_argument("--batch", type=int, help="default 8")
    pl.add_argument("--seq", type=int, help="default 512")
    pl.add_argument("--lora-r", type=int, help="default 8")
    pl.add_argument("--rule", choices=list(RULES), help="default sgd")
    pl.add_argument("--strategy", choices=list(STRATEGIES), help="default spsa")
    pl.add_argument("--pool", type=int, help="candidates per stacked forward (optim.batched); default 1")
    pl.add_argument("--double-quant", action="store_true", default=None)
    pl.add_argument("--embedding-on-cpu", action="store_true", default=None,
                    help="the input embedding in host RAM (model.embedding_on_cpu; untied models)")
    pl.add_argument("--gpus", type=int, default=1, help="ranks of a torchrun run: what N GPUs buy (memory per GPU "
                    "is unchanged: each holds a full 4-bit copy)")
    pl.add_argument("--lora-targets", help="comma-separated decoder linears with LoRA (default q_proj,v_proj), or "
                                           "all-linear: every linear of the decoder, not the LM head")
    pl.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="compute dtype of activations and unquantized weights (default bfloat16)")

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
    k.add_argument("--clear", action="store_true", help="delete what qzo wrote there (converted models, the compiled "
                   "noise generator); other files in the folder stay")
    return p


def _train(args) -> int:
    from ..train.loop import train

    # With no CONFIG the built-in defaults run: they are the demo recipe (the shipped recipe
    # smollm2-135m/demo spells them out; a test keeps the two equal). CONFIG is a YAML file or
    # a shipped recipe's name (qzo.recipes).
    from .progress import TqdmProgress

    summary = train(args.config, args.overrides, args.resume, progress=None if args.no_progress else TqdmProgress())
    if summary.get("written_by") is None:  # rank 0 (or the only process) wrote the run: draw its curves
        from .plot import write_run_plot

        write_run_plot(Path(summary["run_dir"]), print)  # RUN/loss.png when matplotlib is installed
    stopped = summary.get("stopped_by", "")
    if stopped.endswith(" received"):  # SIGINT / SIGTERM at a step boundary: the shell's 128 + signal number
        import signal

        return 128 + int(signal.Signals[stopped.split()[0]])
    return 0


def _recipes(args) -> int:
    from ..recipes import table

    print(table())
    return 0


def _chat(args) -> int:
    from .chat import chat_loop, check_settings, load_for_chat, reply, sampling_kwargs

    sampling_kwargs(args.temperature, args.top_p)  # bad values fail before the model loads
    check_settings(args.max_new_tokens, args.seed)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model, tok = load_for_chat(args.source, args.checkpoint)
    if args.prompt is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        reply(model, tok, messages, args.max_new_tokens, stream=sys.stdout, **sampling)
        sys.stdout.write("\n")
        return 0
    chat_loop(model, tok, args.max_new_tokens, args.system, **sampling)
    return 0


# qzo plan's settings where neither a flag nor a recipe gives them
_PLAN_DEFAULTS = {"quant": "nf4", "double_quant": False, "embedding_on_cpu": False, "dtype": "bfloat16", "batch": 8, "seq": 512, "lora_r": 8,
                  "lora_targets": ("q_proj", "v_proj"), "rule": "sgd", "strategy": "spsa", "pool": 1}


def _plan_recipe(name: str):
    """``(config, the card's budget or None)`` when ``name`` is a recipe YAML or a shipped recipe, else None."""
    from .. import recipes
    from ..config.schema import load_config

    if name.endswith((".yaml", ".yml")):
        return load_config(name), None
    if name not in recipes.names():
        return None
    card = recipes.recipe(name).card  # "24 GiB GPU" for gpu-24gib, "CPU" for the demo
    return load_config(name), card.removesuffix(" GPU").replace(" ", "") if card.endswith("GiB GPU") else None


def _plan(args) -> int:
    from ..train.plan import config_settings, plan, plan_source

    settings, source, gpu = dict(_PLAN_DEFAULTS), args.model, args.gpu
    found = _plan_recipe(args.model)
    if found is not None:
        cfg, card = found
        settings.update(config_settings(cfg))
        source = settings.pop("source")
        if gpu is None and card is not None:
            gpu = card
            print(f"GPU budget {card}: the card {args.model} is sized for (--gpu sets another)")
    flags = {k: getattr(args, k) for k in _PLAN_DEFAULTS}
    if flags["lora_targets"] is not None:
        flags["lora_targets"] = tuple(t.strip() for t in flags["lora_targets"].split(",") if t.strip())
    settings.update({k: v for k, v in flags.items() if v is not None})
    if tuple(settings["lora_targets"]) == ("all-linear",) or settings["lora_targets"] == "all-linear":
        settings["lora_targets"] = "all-linear"
    result = plan(plan_source(source), gpu=gpu, **settings, gpus=args.gpus)
    pool = f", pool {settings['pool']} stacked" if settings["pool"] > 1 else ""
    targets = settings["lora_targets"]
    print(f"{source}, {settings['quant']}, batch {settings['batch']} x {settings['seq']}{pool}, LoRA r "
          f"{settings['lora_r']} on {targets if isinstance(targets, str) else ','.join(targets)}, {settings['dtype']}")
    print(result.table())
    return 0


def _export(args) -> int:
    from ..export.formats import export

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
    from ..cache import cache_dir, clear_cache

    if args.clear:
        freed, kept = clear_cache()
        print(f"cleared what qzo wrote in {cache_dir()} ({freed / 2**20:.1f} MiB)")
        if kept:
            shown = ", ".join(repr(p.name)[:60] for p in kept[:5]) + (", ..." if len(kept) > 5 else "")
            print(f"kept {len(kept)} path(s) there that qzo did not write: {shown}")
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
