"""engram-lm in EleutherAI's lm-evaluation-harness (`lm-eval`, the `[eval]` extra).

Importing this module registers the model name "engram-lm" with lm-eval:

    engram lm-eval --model engram-lm --model_args pretrained=runs/x --tasks hellaswag
    engram lm-eval --model engram-lm --model_args pretrained=runs/retrofit --tasks arc_easy

(`engram lm-eval` is lm-eval's own command line with the name registered first: lm-eval 0.4
finds models only in its own package, so its `lm_eval` command alone does not know it.) In
Python: `import engram_lm.inference.harness` before `lm_eval.simple_evaluate(model="engram-lm", ...)`.

`pretrained` is an engram-lm run or checkpoint folder, or an `engram retrofit` run folder (its
adapter on its base model, memory on; lm-eval's own Hugging Face model then does the scoring).
For engram-lm checkpoints:
- loglikelihood: context + continuation in one forward; the continuation's summed log-prob and
  whether every token of it is the argmax. Requests run in right-padded batches: the model is
  causal (attention, n-gram hashing, the short conv), so a padded row's scores equal its own;
- loglikelihood_rolling: lm-eval's disjoint windows of the model's max_seq_len, the first one
  conditioned on the end-of-document token (the text is a new document);
- generate_until: our KV-cache generation (inference/generate.py), greedy unless the task
  samples, cut at the first stop string.
`memory=` serves the tables from any tier (device, ram, tiered, mmap, ssd; `memory_dir=` an
export folder), as `engram generate` does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, simple_parse_args_string

from engram_lm.inference.generate import SamplingConfig, generate
from engram_lm.inference.loading import load_for_inference


def is_retrofit_run(path: str | Path) -> bool:
    """An `engram retrofit` run folder: its record and its adapter."""
    return (Path(path) / "result.json").is_file() and (Path(path) / "adapter").is_dir()


@register_model("engram-lm")
class EngramHarnessLM(TemplateLM):
    def __init__(self, pretrained: str, memory: str = "device", memory_dir: str | None = None, device: str = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None, **unused: Any) -> None:  # fmt: skip
        super().__init__()
        from tokenizers import Tokenizer

        if unused:
            raise ValueError(f"engram-lm model_args: unknown {sorted(unused)}; known: pretrained, memory, memory_dir, "
                             "device, batch_size, max_length")  # fmt: skip
        self.model, self.state = load_for_inference(pretrained, memory=memory, device=device,
                                                    export_dir=Path(memory_dir) if memory_dir else None)  # fmt: skip
        self.tokenizer_ = Tokenizer.from_file(str(Path(self.state["path"]) / "tokenizer.json"))
        if self.model.config.eod_id is None:
            raise ValueError(f"{pretrained}: the model has no end-of-document token (eod_id) to condition a text's "
                             "first token on; train with a tokenizer that has one")  # fmt: skip
        self._device = torch.device(device)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        if not 1 <= self.max_length <= self.model.config.max_seq_len:
            raise ValueError(f"max_length={max_length}: use 1..{self.model.config.max_seq_len} (the model's max_seq_len)")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        args.pop("max_batch_size", None)
        if str(args.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available() and "device" not in arg_dict:
            print("engram-lm: lm-eval's --device is cuda and this machine has none; running on cpu", file=sys.stderr)
            args["device"] = "cpu"  # lm-eval's own default, not the user's choice
        if "pretrained" not in args:
            raise ValueError("engram-lm needs --model_args pretrained=RUN (an engram-lm run or checkpoint folder, or an "
                             "`engram retrofit` run folder)")  # fmt: skip
        if is_retrofit_run(args["pretrained"]):
            return retrofit_lm(**args)
        return cls(**args)

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eod_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation, greedy) per (key, context ids, continuation ids)."""
        windows = []
        for _, context, continuation in requests:
            if not 1 <= len(continuation) <= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens: score 1..{self.max_length} (max_length)")
            ids = (context + continuation)[-(self.max_length + 1) :]  # the context is cut from the left
            windows.append((ids[:-1], ids[-len(continuation) :]))
        return self._score(windows)

    def _score(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each (input ids, target ids): the targets are the last len(targets) next tokens of the input."""
        out: list[tuple[float, bool] | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # like lengths together
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(windows[batch[0]][0])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.int64)
            for row, i in enumerate(batch):
                ids[row, : len(windows[i][0])] = torch.tensor(windows[i][0])
            logp = F.log_softmax(self.model(ids.to(self._device))[0].float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                inputs, targets = windows[i]
                span = logp[row, len(inputs) - len(targets) : len(inputs)]
                target = torch.tensor(targets)
                out[i] = (float(span.gather(1, target[:, None]).sum()), bool((span.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), prefix_token=self.eot_token_id,
                                                max_seq_len=self.max_length, context_len=1)  # fmt: skip
            results.append(sum(lp for lp, _ in self._score(list(windows))))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # generation stops at end-of-document
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]  # empty: a new document
            cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_k=int(kwargs.pop("top_k", 0)),
                                 top_p=float(kwargs.pop("top_p", 1.0)), stop_id=self.eot_token_id)  # fmt: skip
            text = self.tok_decode(generate(self.model, [prompt], cfg)[0])
            for stop in filter(None, until):
                text = text.split(stop)[0]
            results.append(text)
        return results


def retrofit_lm(pretrained: str, memory: str = "device", device: str = "cpu", batch_size: int | str = 1,
                max_length: int | None = None, **unused: Any):  # fmt: skip
    """lm-eval's Hugging Face model over an `engram retrofit` run: its base with the adapter's memory on.

    Batch size 1 by default: lm-eval left-pads prompts for generation, and Engram hashes the ids
    it is given (pad n-grams included), so a padded batch's generations differ from unpadded ones."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from engram_lm.hf.train import load_retrofit_run

    if unused:
        raise ValueError(f"engram-lm model_args for a retrofit run: unknown {sorted(unused)}; known: pretrained, memory, "
                         "device, batch_size, max_length")  # fmt: skip
    model, result = load_retrofit_run(pretrained, memory)
    model = model.to(device)
    base = Path(result["model"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"))
    eos = model.config.eos_token_id
    if tokenizer.eos_token is None and eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0])
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
