"""Use what qzo trained without qzo: a PEFT adapter and a merged model, in plain transformers.

    python examples/use_exported_adapter.py RUN            # a run directory from `qzo train`
    python examples/use_exported_adapter.py --train 4      # no run yet: train the demo for 4 steps first
    python examples/use_exported_adapter.py --train 4 --set model.source=PATH ...   # that run with overrides

Exports the run twice (``qzo export RUN --peft`` and ``--merged``), then loads each with
transformers (+ peft for the adapter) only, as someone without qzo would, and answers one
prompt with both. The base model of the demo is SmolLM2-135M-Instruct as qzo converted it
from its GGUF (a plain Hugging Face folder in qzo's cache); for your own runs it is the
folder or hub id in the run's ``config.yaml``.
"""

import argparse
from pathlib import Path

import torch


def answer(model, tok, prompt: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", help="a run directory; omitted: --train N steps of the demo first")
    ap.add_argument("--train", type=int, default=4, help="steps to train when no RUN is given")
    ap.add_argument("--prompt", default="What is 7 plus 5?")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of the --train run (repeatable), e.g. model.source=PATH")
    args = ap.parse_args()

    from qzo.export.formats import export
    from qzo.models.load import hf_model_path
    from qzo.runs.reader import load_run_config
    from qzo.train.loop import train

    run = Path(args.run) if args.run else Path(train(None, [f"train.steps={args.train}", "train.eval_every=1000",
                                                            *args.set], progress=False)["run_dir"])
    adapter = export(run, "peft", out=run / "example-peft")
    merged = export(run, "merged", out=run / "example-merged")
    base_folder = hf_model_path(load_run_config(run)["model"]["source"])  # qzo's cache for the built-in demo

    # --- from here on: transformers and peft only ---
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(base_folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=quant, device_map="cpu")
    tuned = PeftModel.from_pretrained(base, str(adapter))  # the same NF4 base the run trained on
    print(f"adapter ({adapter}): {answer(tuned, tok, args.prompt)!r}")

    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)  # bf16 weights, no bitsandbytes
    print(f"merged model ({merged}): {answer(plain, AutoTokenizer.from_pretrained(str(merged)), args.prompt)!r}")


if __name__ == "__main__":
    main()
