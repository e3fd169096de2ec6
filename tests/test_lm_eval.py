"""engram-lm through lm-eval (the [eval] extra), offline on small local tasks (a JSONL file and its
YAML): what lm-eval reports equals our own forward on the same strings, computed here without
lm-eval's tokenisation, batching or windows."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engram_lm.cli import main

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

MC = [{"context": "In the beginning God created the", "choices": [" heavens", " earth", " sea"], "gold": 0},
      {"context": "And God said, Let there be", "choices": [" light", " darkness"], "gold": 0},
      {"context": "The LORD is my", "choices": [" shepherd", " king", " rock"], "gold": 0}]  # fmt: skip
TEXTS = [{"text": "And the earth was without form, and void; and darkness was upon the face of the deep."},
         {"text": "Blessed is the man that walketh not in the counsel of the ungodly."}]  # fmt: skip
GEN = [{"context": "And God called the light", "answer": " Day"}, {"context": "Jesus wept", "answer": "."}]


def write_tasks(folder: Path) -> Path:
    """Three tasks, one per request type, over local JSONL files."""
    tasks = folder / "tasks"
    tasks.mkdir()
    common = {"dataset_path": "json", "test_split": "test"}
    for name, rows, spec in (
        ("toy_mc", MC, {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                        "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}]}),
        ("toy_ppl", TEXTS, {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                            "metric_list": [{"metric": "word_perplexity"}]}),
        ("toy_gen", GEN, {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{answer}}",
                          "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
                          "metric_list": [{"metric": "exact_match"}]}),
    ):  # fmt: skip
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        kwargs = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-datasets")}
        (tasks / f"{name}.yaml").write_text(json.dumps({"task": name, **common, "dataset_kwargs": kwargs, **spec}))  # JSON is YAML
    return tasks


def evaluate(model_args: str, tasks: Path, names: list[str], batch_size: int = 2) -> dict:
    import engram_lm.inference.harness  # noqa: F401  (registers "engram-lm")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="engram-lm", model_args=model_args, tasks=names, batch_size=batch_size,
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True)  # fmt: skip


def continuation_logprob(logits_of, encode, context: str, continuation: str) -> tuple[float, bool]:
    """Our own score: one unpadded forward of context + continuation."""
    ids_c, ids = encode(context), encode(context + continuation)
    with torch.no_grad():
        logp = F.log_softmax(logits_of(torch.tensor([ids])).float()[0], -1)
    targets = torch.tensor(ids[len(ids_c) :])
    span = logp[len(ids_c) - 1 : len(ids) - 1]
    return float(span.gather(1, targets[:, None]).sum()), bool((span.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval") / "run"
    assert main(["train", "--preset", "tiny", "--steps", "12", "--out", str(out), "--quiet"]) == 0
    return out


def test_lm_eval_scores_an_engram_lm_checkpoint_as_our_own_forward_does(run, tmp_path):
    from tokenizers import Tokenizer

    from engram_lm.inference.generate import SamplingConfig, generate
    from engram_lm.inference.loading import load_trained

    results = evaluate(f"pretrained={run}", write_tasks(tmp_path), ["toy_mc", "toy_ppl", "toy_gen"])
    model, state = load_trained(run)
    tok = Tokenizer.from_file(str(Path(state["path"]) / "tokenizer.json"))
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    logits_of = lambda ids: model(ids)[0]  # noqa: E731

    samples = results["samples"]["toy_mc"]
    assert len(samples) == 3 and sum(len(s["resps"]) for s in samples) == 8  # every choice scored, in 2-row batches
    for s in samples:
        for (context, continuation), resp in zip((a for a in s["arguments"]), s["resps"]):
            ll, greedy = resp[0]
            ours, ours_greedy = continuation_logprob(logits_of, encode, context, continuation)
            assert ll == pytest.approx(ours, abs=1e-4) and greedy == ours_greedy
    for s, row in zip(sorted(results["samples"]["toy_ppl"], key=lambda s: s["doc_id"]), TEXTS):
        ids = encode(row["text"])
        with torch.no_grad():  # the text is a new document: its first token is conditioned on end-of-document
            logp = F.log_softmax(model(torch.tensor([[model.config.eod_id] + ids[:-1]]))[0][0].float(), -1)
        assert s["resps"][0][0] == pytest.approx(float(logp.gather(1, torch.tensor(ids)[:, None]).sum()), abs=1e-4)
    for s in sorted(results["samples"]["toy_gen"], key=lambda s: s["doc_id"]):
        context = s["arguments"][0][0]
        ours = tok.decode(generate(model, [encode(context)], SamplingConfig(max_new_tokens=6, stop_id=model.config.eod_id))[0])
        assert s["resps"][0][0] == ours.split("\n")[0].split(".")[0]
    assert 0 <= results["results"]["toy_mc"]["acc,none"] <= 1


def test_rolling_windows_longer_than_the_context_sum_every_token_once(run, tmp_path):
    """A text longer than max_length: lm-eval's disjoint windows, each token scored once, with as
    much context as the window leaves (here checked against our own windows of 16 tokens)."""
    import engram_lm.inference.harness as harness
    from lm_eval.api.instance import Instance

    lm = harness.EngramHarnessLM(pretrained=str(run), max_length=16, batch_size=3)
    text = " ".join(r["text"] for r in TEXTS)
    ids = lm.tok_encode(text)
    assert len(ids) > 32 and len(ids) % 16  # three windows, the last one short
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    inputs = [lm.eot_token_id] + ids[:-1]
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            end = min(start + 16, len(ids))  # tokens start..end, read with the 16 inputs before each (fewer at first)
            window = inputs[max(0, end - 16) : end]
            logp = F.log_softmax(lm.model(torch.tensor([window]))[0][0].float(), -1)
            scored = logp[len(window) - (end - start) :]
            expected += float(scored.gather(1, torch.tensor(ids[start:end])[:, None]).sum())
    assert got == pytest.approx(expected, abs=1e-3)


def test_bad_model_args_are_named(run):
    import engram_lm.inference.harness as harness

    with pytest.raises(ValueError, match="unknown \\['temperature'\\]"):
        harness.EngramHarnessLM.create_from_arg_string(f"pretrained={run},temperature=2")
    with pytest.raises(ValueError, match="needs --model_args pretrained="):
        harness.EngramHarnessLM.create_from_arg_string("memory=ram")
    with pytest.raises(ValueError, match="max_length=100000"):
        harness.EngramHarnessLM(pretrained=str(run), max_length=100000)
    from lm_eval.api.instance import Instance

    lm = harness.EngramHarnessLM(pretrained=str(run), max_length=16)
    with pytest.raises(ValueError, match="max_gen_toks=16 leaves no room for a prompt in max_length=16"):
        lm.generate_until([Instance("generate_until", {}, ("And God said", {"max_gen_toks": 16}), 0)])
    (text,) = lm.generate_until([Instance("generate_until", {}, ("", {"max_gen_toks": 4, "until": []}), 0)])
    assert isinstance(text, str)  # an empty context starts a new document


def test_lm_eval_scores_a_retrofitted_model_with_its_memory_on(tmp_path, hf_base):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from engram_lm.hf.adapter import load_adapter

    folder, docs = hf_base
    run = tmp_path / "r"
    assert main(["retrofit", "--model", str(folder), "--data", str(docs), "--steps", "3", "--out", str(run),
                 "--set", "table_size=97", "--set", "batch_size=2", "--set", "seq_len=32", "--quiet"]) == 0  # fmt: skip
    tasks = tmp_path / "t"
    tasks.mkdir()
    results = evaluate(f"pretrained={run}", write_tasks(tasks), ["toy_mc"], batch_size=1)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with_memory = load_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), run / "adapter").eval()
    moved = 0.0
    for s in results["samples"]["toy_mc"]:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ours, _ = continuation_logprob(lambda x: with_memory(input_ids=x, use_cache=False).logits, encode, context, continuation)
            plain, _ = continuation_logprob(lambda x: base(input_ids=x).logits, encode, context, continuation)
            assert resp[0][0] == pytest.approx(ours, abs=1e-4)
            moved = max(moved, abs(ours - plain))
    assert moved > 1e-3  # the memory is on: the base alone scores otherwise


def test_engram_lm_eval_is_lm_evals_command_line_with_the_model_registered(run, tmp_path, capsys):
    tasks = write_tasks(tmp_path)
    out = tmp_path / "results"
    assert main(["lm-eval", "--model", "engram-lm", "--model_args", f"pretrained={run},memory=mmap", "--tasks", "toy_mc",
                 "--include_path", str(tasks), "--device", "cpu", "--output_path", str(out)]) == 0  # fmt: skip
    saved = json.loads(next(out.rglob("results_*.json")).read_text())
    assert saved["results"]["toy_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert main(["lm-eval", "--model", "engram-lm", "--model_args", "memory=ram", "--tasks", "toy_mc",
                 "--include_path", str(tasks)]) == 2  # fmt: skip
    assert "needs --model_args pretrained=RUN" in capsys.readouterr().err


def test_a_hub_task_without_the_hub_is_one_line_naming_both_ways_out(monkeypatch, capsys):
    import lm_eval.__main__

    def offline():
        raise ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    assert main(["lm-eval", "--model", "engram-lm", "--model_args", "pretrained=x", "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err
    assert "Couldn't reach" in err and "HF_DATASETS_OFFLINE=1" in err and "--include_path" in err
