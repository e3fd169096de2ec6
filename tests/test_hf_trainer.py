"""`EngramTrainer`: transformers.Trainer on a model with Engram added (hf/trainer.py)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram_lm.hf.retrofit import add_engram  # noqa: E402
from engram_lm.hf.trainer import CombinedOptimizer, EngramTrainer  # noqa: E402

from test_hf import V, perturb, tiny_model  # noqa: E402


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.x = torch.randint(2, V, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model(lora: bool = False):
    base = tiny_model("llama")
    for p in base.parameters():
        p.requires_grad_(False)
    model = base
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    retrofit = add_engram(model, f"identity:{V}", layers=(1,), table_size=101, num_heads=2)
    perturb(retrofit)  # the memory active from the start (its value projection starts at zero)
    return base, model, retrofit


def _args(out, steps: int, **kw):
    kw = {"learning_rate": 1e-2, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no", "seed": 0, **kw}
    return transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, **kw)  # fmt: skip


def test_trainer_trains_lora_and_memory_with_sparse_row_tables_and_a_frozen_base(tmp_path):
    base, model, retrofit = _model(lora=True)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    tables = [e.memory.weight.detach().clone() for e in retrofit.engrams.values()]
    args = _args(tmp_path, 3, lr_scheduler_type="constant")
    trainer = EngramTrainer(model=model, args=args, train_dataset=_Windows())
    trainer.train()
    combined = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    lrs = {name: opt.param_groups[0]["lr"] for name, opt in combined.optimizers.items()}
    assert lrs == {"engram": 1e-2, "other": 1e-2, "table": pytest.approx(5e-2)}  # the tables at 5x, through the scheduler
    for before, e in zip(tables, retrofit.engrams.values()):
        moved = (before != e.memory.weight.detach()).any(dim=1)
        assert 0 < int(moved.sum()) < len(moved)  # the rows the 3 batches read moved, and only those
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # LoRA trained (B starts at 0)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and all(0 < x < float("inf") for x in norms)  # dense gradients only: no sparse-norm error


def test_a_resumed_trainer_run_ends_where_the_unbroken_one_does(tmp_path):
    _, model, retrofit = _model()
    EngramTrainer(model=model, args=_args(tmp_path / "whole", 4), train_dataset=_Windows()).train()
    whole = [e.memory.weight.detach().clone() for e in retrofit.engrams.values()]

    _, model, retrofit = _model()
    args = _args(tmp_path / "broken", 2, save_strategy="steps", save_steps=2)
    EngramTrainer(model=model, args=args, train_dataset=_Windows()).train()
    _, model, retrofit = _model()  # a fresh process's model: everything comes from the checkpoint
    EngramTrainer(model=model, args=_args(tmp_path / "broken", 4), train_dataset=_Windows()).train(
        resume_from_checkpoint=str(tmp_path / "broken" / "checkpoint-2"))
    assert all(torch.equal(a, e.memory.weight) for a, e in zip(whole, retrofit.engrams.values()))


def test_combined_optimizer_refuses_shared_parameters_and_foreign_state():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than one optimizer"):
        CombinedOptimizer({"a": torch.optim.SGD([p], lr=0.1), "b": torch.optim.SGD([p], lr=0.1)})
    combined = CombinedOptimizer({"a": torch.optim.SGD([p], lr=0.1), "b": torch.optim.AdamW([q], lr=0.2)})
    assert [g["lr"] for g in combined.param_groups] == [0.1, 0.2]
    combined.param_groups[1]["lr"] = 0.05  # a scheduler writes the groups: the optimizer itself sees it
    assert combined.optimizers["b"].param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match="saved for another setup"):
        combined.load_state_dict({"a": combined.optimizers["a"].state_dict()})


def test_the_trainer_example_trains_lora_and_memory_and_its_adapter_loads_back_to_the_same_logits(tmp_path, hf_base):
    import importlib.util
    from pathlib import Path

    from engram_lm.hf.adapter import load_adapter

    spec = importlib.util.spec_from_file_location("trainer_engram", Path(__file__).parents[1] / "examples" / "trainer_engram.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder, docs = hf_base
    out = tmp_path / "run"
    model, result = example.main(["--model", str(folder), "--data", str(docs), "--out", str(out), "--steps", "3",
                           "--batch-size", "2", "--seq-len", "32", "--table-size", "97", "--lora-r", "4",
                           "--save-steps", "2"])  # fmt: skip
    assert 0 < result["eval_loss"] < float("inf") and (out / "checkpoint-2").is_dir()
    assert (out / "adapter" / "lora" / "adapter_config.json").is_file()
    ids = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    plain = fresh(ids).logits.detach()
    loaded = load_adapter(fresh, out / "adapter").eval()
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)  # LoRA and the memory back, exactly
    assert not torch.allclose(loaded(ids).logits, plain)  # and they change the output


def test_a_resumed_lora_trainer_run_ends_where_the_unbroken_one_does_memory_included(tmp_path):
    """peft saves a PeftModel's Trainer checkpoints with the LoRA weights only (12 keys): the memory
    resumed from fresh tables, off by 0.2. Now every checkpoint holds the memory too."""
    _, model, retrofit = _model(lora=True)
    EngramTrainer(model=model, args=_args(tmp_path / "whole", 4), train_dataset=_Windows()).train()
    whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    _, model, _ = _model(lora=True)
    EngramTrainer(model=model, args=_args(tmp_path / "broken", 2, save_strategy="steps", save_steps=2),
                  train_dataset=_Windows()).train()  # fmt: skip
    _, model, _ = _model(lora=True)  # a fresh process's model: everything trained comes from the checkpoint
    EngramTrainer(model=model, args=_args(tmp_path / "broken", 4), train_dataset=_Windows()).train(
        resume_from_checkpoint=str(tmp_path / "broken" / "checkpoint-2"))
    resumed = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(resumed) == sorted(whole) and any(".engram." in n for n in whole) and any("lora_" in n for n in whole)
    assert [n for n in whole if not torch.equal(whole[n], resumed[n])] == []


def test_add_engram_initialises_from_its_own_seed_whatever_the_global_generator_did():
    def made(init_seed: int, draws: int):
        base = tiny_model("llama")
        torch.manual_seed(123)
        torch.rand(draws)  # whatever ran before (a dataloader, another model) moved the global generator
        retrofit = add_engram(base, f"identity:{V}", layers=(1,), table_size=101, num_heads=2, init_seed=init_seed)
        return {n: p.detach().clone() for n, p in retrofit.named_parameters()}, torch.rand(1)

    (a, after_a), (b, after_b), (c, _) = made(0, 1), made(0, 7), made(1, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same start, whatever the global generator's state
    assert any(not torch.equal(a[n], c[n]) for n in a)  # another seed, another start
    assert not torch.equal(after_a, after_b)  # the global generator was left where the caller had it


def test_two_runs_of_the_trainer_example_end_alike_and_a_resumed_one_too(tmp_path, hf_base):
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("trainer_engram", Path(__file__).parents[1] / "examples" / "trainer_engram.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder, docs = hf_base

    def run(out, steps, *extra):
        example.main(["--model", str(folder), "--data", str(docs), "--out", str(out), "--steps", str(steps),
                      "--batch-size", "2", "--seq-len", "32", "--table-size", "97", "--lora-r", "4", "--save-steps", "2",
                      *extra])  # fmt: skip
        return {**load_file(str(out / "adapter" / "adapter.safetensors")),
                **{f"lora.{k}": v for k, v in load_file(str(out / "adapter" / "lora" / "adapter_model.safetensors")).items()}}

    first, second = run(tmp_path / "a", 4), run(tmp_path / "b", 4)
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
    run(tmp_path / "c", 2)
    resumed = run(tmp_path / "c", 4, "--resume")
    assert all(torch.equal(first[k], resumed[k]) for k in first)
