"""Several processes: DDP and FSDP2 on 2 processes equal 1 process with the same global batch (tied and untied),
activation checkpointing gives exact gradients, a sharded checkpoint resumed on 2 and on 1 process equals the
uninterrupted run, and the consolidated final checkpoint loads in transformers. The file doubles as the worker
script torchrun launches."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from data import Encoder, load_dataset
from eval import evaluate, my_batches
from extras.init import create_model, tokenizer_corpus
from extras.options import LoRA
from helpers import ROOT, TINY, StopAt, cli, config, cpt_setup, launch, ok, read_records, step_gradients
from infra.config import ModelConfig
from infra.device import memory_estimate
from infra.distributed import checkpoint_layers, deal, end_distributed, setup_distributed
from infra.runs import Interrupted, open_run
from infra.tokenizer import Tokenizer
from model import Decoder
from train import train

STEPS = 8


def fsdp_config(**kw):
    return config(steps=STEPS, accum=4, **kw)  # 2 micro-batches per process and step: gradient sync skipped once


def run(data_path, model, out, shard="none", ac=False, stop=0, resume=False, rank=0, world=1, device="cpu", lora=0,
        precision="fp32"):
    """One CPT run as the tests' reference (in-process) or as a worker's job (under torchrun); with `lora`, rank-`lora`
    adapters on the base in the compute dtype. FSDP builds the model on the meta device, as the commands do."""
    blocks, tokenizer = cpt_setup(data_path, model)
    data = StopAt(blocks, step=stop, accum=4 // world) if stop and rank == 0 else blocks  # rank 0 alone is stopped
    run_dir = open_run(out, {"test": 1}, resume=resume, overwrite=False, rank=rank)
    net = LoRA(lora_rank=lora).load(model, precision, seed=0, shard=shard)  # on --resume, train() loads the checkpoint
    cfg = fsdp_config(shard=shard, activation_checkpointing=ac, eval_every=4, select="score", precision=precision)
    try:
        train(net, data, cfg, run_dir, tokenizer=tokenizer, device=torch.device(device), rank=rank, world=world,
              resume=resume, validate=score)
    except Interrupted:
        pass
    if shard == "fsdp" and net.config.tie_embeddings:
        assert net.lm_head.weight is net.embed_tokens.weight, "FSDP untied the embeddings"


def score(model: Decoder) -> dict:
    """A validation that depends on every weight (under FSDP it sees the gathered copy on rank 0)."""
    return {"score": -sum(float(p.double().square().sum()) for p in model.parameters()) % 1.0}


# Sharded evaluation: few users and 5 beams (K = 5), in batches of 2 users whose prompts differ in length, so that
# several batches of different costs are dealt; seconds on a tiny model.
SHARED = dict(beams=5, ks=(5,), batch_users=2)


def evaluation(data_path, model, exact=False, users=6) -> dict:
    net, encoder = Decoder.from_pretrained(model), Encoder(Tokenizer.from_pretrained(model))
    return evaluate(net, encoder, load_dataset(data_path), "games", split="valid", exact=exact, users=users, **SHARED)


def validated_run(data_path, model, out, shard="none", rank=0, world=1, device="cpu"):
    """Two steps at learning rate 0 (the weights stay the model's on any process count), each validated by sharded
    evaluation: its figures, best.json and best/ must equal one process's exactly."""
    blocks, tokenizer = cpt_setup(data_path, model)
    run_dir = open_run(out, {"test": 1}, resume=False, overwrite=False, rank=rank)
    ds, encoder = load_dataset(data_path), Encoder(tokenizer)
    validate = lambda m: evaluate(m, encoder, ds, "games", split="valid", users=6, **SHARED)["model"]  # noqa: E731
    cfg = config(steps=2, accum=4, lr=0.0, shard=shard, eval_every=1, select="ndcg@5")
    train(Decoder.from_pretrained(model), blocks, cfg, run_dir, tokenizer=tokenizer, device=torch.device(device),
          rank=rank, world=world, validate=validate)


def worker(spec: str) -> None:
    import train as train_module  # without the peak-FLOP/s probe (a 2048³ matmul per process; MFU is not tested)
    train_module.peak_flops = lambda device, precision, remeasure=False: 1e12
    rank, world, device = setup_distributed()
    for job in json.loads(Path(spec).read_text()):
        kind = job.pop("kind", "")
        if kind == "evaluate":  # every process writes the whole result it holds
            Path(f"{job.pop('out')}-rank{rank}.json").write_text(json.dumps(evaluation(**job)))
        elif kind == "command":  # the last job: a command ends the process group
            ok(cli(*job["args"]))
        elif "validated" in job and job.pop("validated"):
            validated_run(**job, rank=rank, world=world, device=str(device))
        else:
            run(**job, rank=rank, world=world, device=str(device))


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(world, tiny_model):
    blocks, _ = cpt_setup(world, tiny_model)
    plan = blocks.micro_batches(0)[:2]
    n_targets = sum(blocks.n_targets(b) for b in plan)
    grads, kept = [], []
    for ac in (False, True):
        model = Decoder.from_pretrained(tiny_model)
        if ac:
            checkpoint_layers(model)
        sizes = []  # bytes autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=sizes: s.append(t.nbytes) or t, lambda t: t):
            _, applied = step_gradients(model, [blocks.collate(b) for b in plan], n_targets)
        grads.append(applied)
        kept.append(sum(sizes))
        assert list(model.state_dict()) == list(Decoder.from_pretrained(tiny_model).state_dict())  # names unchanged
    assert len(grads[1]) == len(grads[0]) == len(list(model.parameters()))
    for a, b in zip(grads[0].values(), grads[1].values()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert kept[1] < 0.5 * kept[0], kept


@pytest.fixture(scope="module")
def runs(world, tiny_model, tmp_path_factory):
    """Every run of the tests below, in two launches: the references on one process without sharding (in-process),
    then FSDP on 2 processes (tied; untied with activation checkpointing; stopped at step 3 and resumed; stopped at
    step 5; then the sharded evaluations' jobs), then the last resumed on 1 process."""
    out = tmp_path_factory.mktemp("fsdp")
    untied = out / "untied-model"
    create_model(tokenizer_corpus(load_dataset(world)), untied, ModelConfig(**{**vars(TINY), "tie_embeddings": False}))
    for name, model in (("tied", tiny_model), ("untied", untied)):
        run(world, model, out / f"ref-{name}")
    common = dict(data_path=str(world), model=str(tiny_model), shard="fsdp")
    for name, lora in (("lora", dict(lora=4)), ("lora-bf16", dict(lora=4, precision="bf16"))):
        run(world, tiny_model, out / f"ref-{name}", **lora)
    jobs = [dict(common, out=str(out / "tied")),
            dict(common, model=str(untied), out=str(out / "untied-ac"), ac=True),
            dict(common, out=str(out / "cut"), stop=3),
            dict(common, out=str(out / "cut"), resume=True),
            dict(common, out=str(out / "cut21"), stop=5),
            dict(common, out=str(out / "lora"), lora=4, stop=3),
            dict(common, out=str(out / "lora"), lora=4, resume=True),
            dict(common, out=str(out / "lora-bf16"), lora=4, precision="bf16", ac=True),
            *sharded_evaluation_jobs(world, tiny_model, out)]  # in the same launch: one start of 2 processes less
    (out / "two.json").write_text(json.dumps(jobs))
    (out / "one.json").write_text(json.dumps([dict(common, out=str(out / "cut21"), resume=True)]))
    launch(__file__, str(out / "two.json"), processes=2)
    shards = sorted(p.name for p in (out / "cut21" / "checkpoints" / "step-0000005").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]  # each process wrote its shards
    launch(__file__, str(out / "one.json"))
    return out


def weights(run_dir: Path, which: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run_dir / which / "model.safetensors")


def assert_same_run(got: Path, want: Path, **tolerance) -> None:
    """Equal final and best weights (same names: plain HF layout), the same best step, and the same losses and
    validations at steps 1..STEPS, once each."""
    for which in ("final", "best"):
        a, b = weights(got, which), weights(want, which)
        assert sorted(a) == sorted(b)
        for k in b:
            torch.testing.assert_close(a[k], b[k], **(tolerance or dict(atol=1e-5, rtol=1e-5)),
                                       msg=f"{got.name}/{which}: {k}")
    assert json.loads((got / "best.json").read_text())["step"] == json.loads((want / "best.json").read_text())["step"]
    logs = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (got, want)]
    assert [r["step"] for r in logs[0] if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in logs[0] if "validation" in r] == [4, STEPS]
    for key in ("loss", "validation"):
        values = [[r[key]["score"] if key == "validation" else r[key] for r in log if key in r] for log in logs]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-5, atol=1e-6)


def test_fsdp_on_two_processes_equals_one_tied_and_untied(runs, tiny_model):
    assert_same_run(runs / "tied", runs / "ref-tied")
    assert_same_run(runs / "untied-ac", runs / "ref-untied")  # with activation checkpointing too
    assert "lm_head.weight" in weights(runs / "untied-ac") and "lm_head.weight" not in weights(runs / "tied")
    initial = load_file(Path(tiny_model) / "model.safetensors")["model.norm.weight"]
    assert not torch.equal(weights(runs / "tied")["model.norm.weight"], initial)  # it trained


def test_fsdp_with_lora_on_two_processes_equals_one_and_saves_the_adapters_only(runs, tiny_model):
    """Stopped at step 3 and resumed (fp32); a bf16 base beside fp32 adapters, with activation checkpointing."""
    assert_same_run(runs / "lora", runs / "ref-lora")
    assert_same_run(runs / "lora-bf16", runs / "ref-lora-bf16", atol=1e-5, rtol=1.6e-2)  # bf16: one rounding step
    for name in ("lora", "lora-bf16"):
        a, b = (load_file(runs / d / "final-adapter" / "adapter_model.safetensors") for d in (name, f"ref-{name}"))
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    assert {v.dtype for v in weights(runs / "lora-bf16").values()} == {torch.bfloat16}
    step = runs / "lora" / "checkpoints" / "step-0000008"
    saved = FileSystemReader(step).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]  # no frozen weight, not even a tied lm_head
    assert len(model_keys) == 2 * 7 * TINY.n_layers and all(k.endswith((".lora_A", ".lora_B")) for k in model_keys)
    numel = {k: int(np.prod(v.size)) for k, v in saved.items() if hasattr(v, "size")}
    adapters = sum(n for k, n in numel.items() if k.startswith("model."))
    assert adapters == TINY.lora_params(4) and sum(numel.values()) <= 3 * adapters + 100  # + AdamW's two moments


def test_fsdp_run_stopped_and_resumed_on_two_or_one_process_equals_the_uninterrupted_one(runs):
    assert_same_run(runs / "cut", runs / "ref-tied")
    assert_same_run(runs / "cut21", runs / "ref-tied")


def test_consolidated_checkpoint_loads_in_transformers_with_equal_logits(runs, world, tiny_model):
    from transformers import AutoModelForCausalLM
    blocks, _ = cpt_setup(world, tiny_model)
    ids = torch.as_tensor(blocks.collate(blocks.micro_batches(0)[0])[0])
    for name, ref in (("tied", "ref-tied"), ("untied-ac", "ref-untied")):
        hf = AutoModelForCausalLM.from_pretrained(runs / name / "final", dtype=torch.float32)
        reference = Decoder.from_pretrained(runs / ref / "final")  # trained on one process without sharding
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, reference(ids), atol=1e-4, rtol=1e-4)

def test_memory_estimate_counts_bytes_as_documented():
    gib = 2**30  # 1e9 parameters, 10 layers of width 1000, 1e8 embedding parameters, 1000 tokens per GPU, 8 GPUs
    args = (10**9, 10, 1000, 10**8, 1000)
    fsdp = memory_estimate(*args)
    assert fsdp["state_gib"] * gib == 16e9 / 8 + 2 * (1e8 + 2 * 9e7)  # shards + bf16 root and two gathered layers
    assert fsdp["activations_gib"] * gib == 34 * 1000 * 10 * 1000
    assert memory_estimate(*args, shard="ddp")["state_gib"] * gib == 22e9
    assert memory_estimate(*args, checkpointing=True)["activations_gib"] * gib == (2 * 10 + 34) * 1000 * 1000
    assert memory_estimate(*args, accumulating=True)["state_gib"] * gib == fsdp["state_gib"] * gib + 4e9




@pytest.mark.parametrize("tied", [True, False])
def test_two_processes_equal_one_with_the_same_global_batch(world, tiny_model, tmp_path, tied):
    model = tiny_model
    if not tied:  # an untied lm_head: its gradient must sync too
        model = tmp_path / "untied"
        untied = ModelConfig(**{**vars(TINY), "tie_embeddings": False})
        create_model(tokenizer_corpus(load_dataset(world)), model, untied)
    args = ["pretrain", "--data", str(world), "--model", str(model), "--tokens", "2048", "--block-len", "32",
            "--micro-batch", "4", "--batch-tokens", "512", "--precision", "fp32", "--no-progress", "--val-users", "5"]
    ok(cli(*args, "--out", tmp_path / "one"))
    launch(ROOT / "cprec.py", *args, "--out", str(tmp_path / "two"), processes=2)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert not torch.equal(one["model.norm.weight"], torch.ones_like(one["model.norm.weight"]))  # it trained
    assert ("lm_head.weight" in one) != tied
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
              for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_command_leaves_no_process_group_behind(world, tiny_model, tmp_path):
    """gloo's threads outliving the interpreter abort a finished process (pytorch#190489, a flaky CI failure here):
    every command destroys its process group, here FSDP's one-process group, before it returns."""
    ok(cli("pretrain", "--data", world, "--model", tiny_model, "--tokens", "512", "--block-len", "32", "--micro-batch",
           "4", "--batch-tokens", "128", "--precision", "fp32", "--shard", "fsdp", "--no-progress", "--val-users", "5",
           "--out", tmp_path / "run"))
    assert not torch.distributed.is_initialized()


def test_deal_gives_whole_jobs_balanced_the_same_way_every_time():
    costs = [5.0, 1.0, 8.0, 3.0, 3.0, 2.0, 7.0, 1.0]
    hands = deal(costs, 3)
    assert sorted(j for hand in hands for j in hand) == list(range(len(costs)))  # every job once, whole
    assert hands == deal(list(costs), 3) and all(hand == sorted(hand) for hand in hands)  # deterministic, in order
    loads = [sum(costs[j] for j in hand) for hand in hands]
    assert max(loads) - min(loads) <= max(costs) and max(loads) == 10  # LPT: 8+2, 7+3, 5+3+1+1
    assert deal(costs, 1) == [list(range(len(costs)))] and deal([], 2) == [[], []]
    assert deal([1.0], 2) == [[0], []]  # a process may get nothing
    batches = [[0, 1], [2], [3, 4, 5]]  # one process: all of evaluation's batches, in order
    assert my_batches(batches, [[1] * n for n in (3, 9, 4, 2, 2, 2)]) == batches


COMMAND = ["evaluate", "--domain", "games", "--users", "6", "--split", "valid", "--no-progress"]


def sharded_evaluation_jobs(world: Path, tiny_model: Path, out: Path) -> list[dict]:
    """The 2-process half of the test below: evaluate (beam search and --exact), validated runs under DDP and FSDP,
    and last (it ends the process group) the evaluate command."""
    common = dict(data_path=str(world), model=str(tiny_model))
    return [dict(common, kind="evaluate", out=str(out / "beam")),
            dict(common, kind="evaluate", out=str(out / "exact"), exact=True, users=2),
            *(dict(common, validated=True, out=str(out / shard), shard=shard) for shard in ("ddp", "fsdp")),
            dict(kind="command", args=[*COMMAND, "--data", str(world), "--model", str(tiny_model), "--out",
                                       str(out / "eval" / "two.json")])]


def test_sharded_evaluation_on_two_processes_equals_one_user_by_user(runs, world, tiny_model):
    """evaluate (beam search and --exact), a training run's validations (DDP, FSDP) and the evaluate command on 2
    processes: batches of different costs dealt to them, every per-user rank and top list, every figure and best/ as
    on 1 process; the command's result written once, by rank 0."""
    out = runs  # the 2-process results (sharded_evaluation_jobs, in runs' launch); this process's beside them
    for name, exact, users in (("beam", False, 6), ("exact", True, 2)):
        one = json.loads(json.dumps(evaluation(world, tiny_model, exact=exact, users=users)))
        for rank in (0, 1):  # every process holds the whole result
            two = json.loads((out / f"{name}-rank{rank}.json").read_text())
            assert two["per_user"] == one["per_user"] and two["model"] == one["model"], (name, rank)
            assert two["top10"] == one["top10"] and two["popularity"] == one["popularity"]
    validated_run(world, tiny_model, out / "one")
    for shard in ("ddp", "fsdp"):
        logs = [[r["validation"] for r in read_records(out / d) if "validation" in r] for d in ("one", shard)]
        assert len(logs[0]) == 2 and logs[1] == logs[0], shard
        assert (out / shard / "best.json").read_text() == (out / "one" / "best.json").read_text()
        best, want = weights(out / shard, "best"), weights(out / "one", "best")
        assert sorted(best) == sorted(want) and all(torch.equal(best[k], want[k]) for k in want), shard
    ok(cli(*COMMAND, "--data", world, "--model", tiny_model, "--out", out / "eval" / "one.json"))
    files = sorted(p.name for p in (out / "eval").iterdir())
    assert files == ["one-per_user.jsonl", "one.json", "two-per_user.jsonl", "two.json"]  # no stray file
    read = lambda name: (out / "eval" / name).read_text()  # noqa: E731
    assert read("two-per_user.jsonl") == read("one-per_user.jsonl")
    one, two = (json.loads(read(f"{n}.json")) for n in ("one", "two"))
    assert two["model"] == one["model"] and two["users"] == one["users"] == 6


if __name__ == "__main__":
    worker(sys.argv[1])
    end_distributed(clean=True)
