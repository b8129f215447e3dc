"""The decoder section: our Decoder against transformers' LlamaForCausalLM on the same safetensors, inputs and
threads, after a parity guard (equal logits, loss and a gradient) that refuses to time a broken comparison."""
from __future__ import annotations

import gc
import statistics
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import Options, Step, add_memory, throughput, time_interleaved
from infra.config import config_to_hf
from infra.device import autocast
from model import Decoder

IMPLS = ("ours", "transformers")


def quiet_transformers() -> None:
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # its "Loading weights" bars would bury the table


def write_hf_checkpoint(o: Options, path: str) -> None:
    """A random transformers Llama saved as safetensors: both implementations then load the very same bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    quiet_transformers()
    torch.manual_seed(o.seed)
    LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(o.shape))).save_pretrained(path)


def load_impl(impl: str, path: str, device: str) -> nn.Module:
    if impl == "ours":
        return Decoder.from_pretrained(path, device=device)
    from transformers import LlamaForCausalLM
    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device, torch.float32)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.config.use_cache = False  # a full-sequence forward needs no KV cache; ours builds none either
    return model


def logits_of(model: nn.Module, impl: str, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if impl == "ours" else model(input_ids=ids, use_cache=False).logits


def make_inputs(o: Options) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(o.seed + 1)
    return tuple(torch.randint(0, o.shape.vocab_size, (o.batch, o.seq), generator=g).to(o.device) for _ in range(2))


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Outside both models, so neither's built-in loss (HF shifts labels, upcasts) changes the work timed.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_step(model: nn.Module, impl: str, mode: str, precision: str, ids: torch.Tensor, targets: torch.Tensor,
              device: str) -> Step:
    model.train(mode == "train")  # no dropout in either; HF's SDPA path reads self.training

    def run():
        with torch.set_grad_enabled(mode == "train"), autocast(precision, torch.device(device)):
            logits = logits_of(model, impl, ids)
            loss = loss_of(logits, targets) if mode == "train" else None
        if loss is not None:
            loss.backward()  # outside autocast, as its documentation asks
    return (lambda: model.zero_grad(set_to_none=True)), run


def decoder_step(path: str, impl: str, mode: str, precision: str, o: Options) -> Step:
    """A row's step on its own freshly loaded model and inputs: what add_memory measures."""
    return make_step(load_impl(impl, path, o.device), impl, mode, precision, *make_inputs(o), o.device)


def check_parity(models: dict[str, nn.Module], ids: torch.Tensor, targets: torch.Tensor, device: str) -> None:
    """Refuse to time a broken comparison: fp32 logits, loss and a first-layer gradient must agree."""
    with torch.no_grad():
        logits = {impl: logits_of(m.eval(), impl, ids) for impl, m in models.items()}
    diff = (logits["ours"] - logits["transformers"]).abs().max().item()
    assert diff <= 1e-4, f"logits differ from transformers by {diff:.2e} (> 1e-4): the comparison is broken"
    losses = {impl: loss_of(x, targets).item() for impl, x in logits.items()}
    assert abs(losses["ours"] - losses["transformers"]) <= 1e-4, f"losses differ: {losses}"
    del logits
    grads = {}
    for impl, model in models.items():
        reset, run = make_step(model, impl, "train", "fp32", ids, targets, device)
        run()
        layer0 = model.layers[0] if impl == "ours" else model.model.layers[0]
        grads[impl] = layer0.self_attn.q_proj.weight.grad.clone()
        reset()
    rel = ((grads["ours"] - grads["transformers"]).norm() / grads["transformers"].norm()).item()
    assert rel <= 1e-3, f"layer-0 q_proj gradients differ by {rel:.2e} relative"


def bench_decoder(o: Options) -> list[dict]:
    device, rows, probes = o.device, [], []
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as path:
        write_hf_checkpoint(o, path)
        models = {impl: load_impl(impl, path, device) for impl in IMPLS}
        ids, targets = make_inputs(o)
        check_parity(models, ids, targets, device)
        for mode in ("train", "infer"):
            # Forward is a third of forward+backward's FLOPs (2N of 6N; the same share of attention).
            flops = o.shape.train_flops_per_token(o.seq) / (1 if mode == "train" else 3)
            for precision in o.precisions:
                steps = {impl: make_step(m, impl, mode, precision, ids, targets, device) for impl, m in models.items()}
                times, slots = time_interleaved(steps, o.warmup, o.reps, device)
                for impl in IMPLS:
                    rows.append(dict(section="decoder", impl=impl, mode=mode, precision=precision,
                                     **throughput(times[impl], o.batch * o.seq, flops, slots[impl])))
                    probes.append((rows[-1], decoder_step, (path, impl, mode, precision, o)))
                # Ratio of adjacent interleaved reps, then the median: a slow spell hits both runs of a pair.
                rows[-2]["ratio"] = statistics.median(b / a for a, b in zip(times["ours"], times["transformers"]))
        del models, steps
        gc.collect()
        add_memory(o, probes, ("transformers.models.llama.modeling_llama",))
    return rows


