"""Fault injection, systematically: every command that reads files, given a missing, empty, truncated, corrupted or
wrong-type input, ends with exit status 2 and one line naming the file, never a traceback; every command that writes
never deletes a directory it did not write. The CLI runs in-process (tests/helpers.cli) to stay fast."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import resource
except ImportError:  # not POSIX
    resource = None

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from data import Encoder, cpt_stream, load_dataset
from extras.init import written_by_init
from helpers import cli, ok, refused
from infra.datasets import Domain, write_dataset
from infra.files import UserError, atomic_dir
from infra.tokenizer import Tokenizer
from model import Decoder


# --------------------------------------------------------------------------------------------------- the faults
def truncate(data: bytes) -> bytes:
    return data[:len(data) // 2 + 1]  # +1: an empty file is a fault of its own


def corrupt(data: bytes) -> bytes:
    """16 bytes of 0xff in the middle: not UTF-8, not JSON, not protobuf, NaN as float32 whatever the alignment."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 16 + data[middle + 16:]


def inject(path: Path, fault: str) -> None:
    if fault == "missing":
        path.unlink()
    elif fault == "wrong-type":  # a directory where a file belongs
        path.unlink()
        path.mkdir()
        (path / "x").write_text("x")
    else:
        path.write_bytes({"empty": lambda d: b"", "truncated": truncate, "corrupted": corrupt}[fault](
            path.read_bytes()))


FAULTS = ["missing", "empty", "truncated", "corrupted", "wrong-type"]
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.model"]
DATA_FILES = ["manifest.json", "items.jsonl", "interactions.tsv"]


def command(name: str, model: Path, data: Path, out: Path, overwrite: bool = False) -> list:
    """The command line of `name` on a model and a dataset, with the smallest settings, writing under `out`."""
    args = {
        "evaluate": ["evaluate", "--domain", "games", "--model", model, "--data", data, "--users", 3,
                     "--out", out / "eval.json"],
        "pretrain": ["pretrain", "--model", model, "--data", data, "--out", out / "run", "--tokens", 512,
                     "--block-len", 32, "--micro-batch", 4, "--batch-tokens", 128, "--no-progress",
                     "--val-users", 1, "--save-every", 0],
        "finetune": ["finetune", "--domain", "games", "--model", model, "--data", data, "--out", out / "run",
                     "--epochs", 1, "--users-fraction", 0.1, "--val-users", 2, "--test-users", 2, "--no-progress"],
        "reproduce": ["reproduce", "--model", model, "--data", data, "--out", out / "run", "--cpt-tokens", 512,
                      "--sft-epochs", 1],
        "init": ["init", "--data", data, "--out", out / "model", "--vocab", 512, "--dim", 32, "--layers", 1,
                 "--heads", 2, "--kv-heads", 2, "--ffn", 64],
    }[name]
    return args + ["--overwrite"] * overwrite


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def data_copy(world, tmp_path):
    return Path(shutil.copytree(world, tmp_path / "data", ignore=shutil.ignore_patterns("cache")))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("file", MODEL_FILES)
@pytest.mark.parametrize("name", ["evaluate", "pretrain", "finetune", "reproduce"])
def test_broken_model_file(name, file, fault, model_copy, world, tmp_path):
    inject(model_copy / file, fault)
    expected = "no checkpoint" if (name, file, fault) == ("finetune", "config.json", "missing") else file
    refused(cli(*command(name, model_copy, world, tmp_path)), expected)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("file", DATA_FILES)
@pytest.mark.parametrize("name", ["evaluate", "pretrain", "finetune", "reproduce", "init"])
def test_broken_dataset_file(name, file, fault, tiny_model, data_copy, tmp_path):
    inject(data_copy / file, fault)
    refused(cli(*command(name, tiny_model, data_copy, tmp_path)), file)
    assert not (tmp_path / "model").exists()  # init wrote nothing


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(change(obj)))


@pytest.mark.parametrize("change, fragments", [
    (lambda c: [c], ["config.json: expected a JSON object", "found list"]),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, ["config.json: no hidden_size", "expected"]),
    (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, ["config.json: no vocab_size"]),
    (lambda c: {**c, "hidden_size": "64"}, ["config.json: hidden_size='64'; expected a positive integer"]),
    (lambda c: {**c, "num_hidden_layers": 0}, ["config.json: num_hidden_layers=0; expected a positive integer"]),
    (lambda c: {**c, "num_key_value_heads": 3}, ["config.json: num_attention_heads=4 is not a multiple of"]),
    (lambda c: {**c, "rms_norm_eps": "small"}, ["config.json: rms_norm_eps='small'; expected a positive number"]),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3"}}, ["config.json: rope_scaling: factor=None"]),
    (lambda c: {**c, "hidden_size": 128}, ["weights do not match config.json"]),
])
def test_wrong_config_values(change, fragments, model_copy, world, tmp_path):
    edit_json(model_copy / "config.json", change)
    refused(cli(*command("evaluate", model_copy, world, tmp_path)), *fragments)


def test_non_finite_weights_are_refused_at_load(model_copy, world, tmp_path):
    """Issue 3: a NaN checkpoint evaluated to all-zero metrics with exit 0."""
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(weights, model_copy / "model.safetensors")
    refused(cli(*command("evaluate", model_copy, world, tmp_path)), "model.safetensors: tensor "
            "model.layers.1.mlp.up_proj.weight holds NaN or infinite values")
    assert not (tmp_path / "eval.json").exists()


def test_tokenizer_larger_than_the_vocabulary(model_copy, world, tmp_path):
    """A tokenizer whose ids do not fit the embedding used to fail with an IndexError mid-run."""
    edit_json(model_copy / "config.json", lambda c: {**c, "vocab_size": 300})
    weights = load_file(model_copy / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:300].clone()
    save_file(weights, model_copy / "model.safetensors")
    for name in ("evaluate", "pretrain", "finetune"):
        refused(cli(*command(name, model_copy, world, tmp_path / name)),
                "tokenizer.model: 512 tokens but config.json has vocab_size 300")


@pytest.mark.parametrize("file, content, fragments", [
    ("manifest.json", "[]", ["manifest.json: format 'list', expected 1"]),
    ("manifest.json", '{"format": 1}', ["manifest.json: malformed; expected domains"]),
    ("manifest.json", '{"format": 1, "domains": [{"key": "a"}], "fingerprint": "x"}', ["manifest.json: malformed"]),
    ("items.jsonl", "[1, 2]\n", ["items.jsonl:1: malformed item record"]),
    ("items.jsonl", '{"item": 7, "domain": "games", "title": "x"}\n', ["items.jsonl:1: malformed item record"]),
    ("interactions.tsv", "u1\tno-such-item\t5\n", ["interactions.tsv:1: malformed interaction"]),
])
def test_wrong_dataset_records(file, content, fragments, tiny_model, data_copy, tmp_path):
    (data_copy / file).write_text(content)
    refused(cli(*command("evaluate", tiny_model, data_copy, tmp_path)), *fragments)


def test_dataset_cut_at_a_line_boundary_is_caught_by_the_fingerprint(tiny_model, data_copy, tmp_path):
    lines = (data_copy / "interactions.tsv").read_text().splitlines(keepends=True)
    (data_copy / "interactions.tsv").write_text("".join(lines[:-10]))  # parses: only the fingerprint can tell
    refused(cli(*command("evaluate", tiny_model, data_copy, tmp_path)),
            "items.jsonl and interactions.tsv do not match the fingerprint in manifest.json")


def corrupt_header(data: bytes) -> bytes:
    return b"\x00" * 16 + data[16:]


def test_corrupted_token_cache_is_rebuilt(tiny_model, data_copy):
    """The CPT token cache is ours: damaged, it is rebuilt rather than crashing pretrain."""
    ds, encoder = load_dataset(data_copy), Encoder(Tokenizer.from_pretrained(tiny_model))
    stream = np.array(cpt_stream(ds, encoder))  # a copy: the returned stream is the file, memory-mapped
    cache = next((data_copy / "cache").glob("cpt-*.npy"))
    good = cache.read_bytes()
    for damage in (truncate, corrupt_header):
        cache.write_bytes(damage(good))
        assert (cpt_stream(ds, encoder) == stream).all() and cache.read_bytes() == good


def test_a_token_cache_edited_in_place_is_rebuilt(tiny_model, data_copy):
    """The cache records the checksum of its content and what it was made from (cpt-KEY.json) and is verified on use:
    ids overwritten in place (before: trained on silently) or out of the vocabulary (before: an IndexError) are
    found, and the stream is rebuilt, the same as a clean one; pretrain then gives a clean run's result."""
    ds, encoder = load_dataset(data_copy), Encoder(Tokenizer.from_pretrained(tiny_model))
    stream = np.array(cpt_stream(ds, encoder))
    cache = next((data_copy / "cache").glob("cpt-*.npy"))
    good = cache.read_bytes()
    for ids in ([7, 8, 9, 10], [2 ** 31] * 4):  # in-vocabulary ids that are wrong there; out-of-vocabulary ones
        with open(cache, "r+b") as f:
            f.seek(len(good) - 64)
            f.write(np.array(ids, np.uint32).tobytes())
        assert cache.read_bytes() != good
        assert (cpt_stream(ds, encoder) == stream).all() and cache.read_bytes() == good
    results = []
    for edit in (False, True):
        if edit:
            cache.write_bytes(good[:-16] + np.array([2 ** 31] * 4, np.uint32).tobytes())
        ok(cli(*command("pretrain", tiny_model, data_copy, data_copy.parent / f"out{edit}")))
        results.append(json.loads((data_copy.parent / f"out{edit}" / "run" / "results.json").read_text()))
    assert results[0]["training"]["loss"] == results[1]["training"]["loss"] and cache.read_bytes() == good


def test_a_read_only_dataset_keeps_its_token_cache_in_the_user_cache(tiny_model, data_copy, tmp_path, monkeypatch):
    """Before: "choose an output folder", though no option moves the cache. Now it goes to $XDG_CACHE_HOME/cprec;
    when neither can be written, one line names both and the variable. (Tests run as root: the folder's being
    read-only is simulated.)"""
    import infra.cache
    ds, encoder = load_dataset(data_copy), Encoder(Tokenizer.from_pretrained(tiny_model))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    can_write = infra.cache.can_write
    monkeypatch.setattr(infra.cache, "can_write", lambda folder: folder != data_copy / "cache" and can_write(folder))
    stream = np.array(cpt_stream(ds, encoder))
    assert not (data_copy / "cache").exists() and len(list((tmp_path / "user" / "cprec").glob("cpt-*.npy"))) == 1
    monkeypatch.setattr(infra.cache, "can_write", lambda folder: False)
    assert (cpt_stream(ds, encoder) == stream).all()  # found there again
    shutil.rmtree(tmp_path / "user")
    with pytest.raises(UserError, match="neither can be written.*XDG_CACHE_HOME"):
        cpt_stream(ds, encoder)


def test_an_unhealthy_checkpoint_is_never_written_and_the_advice_leads_to_a_trained_run(resumable, world, tiny_model,
                                                                                       tmp_path):
    """Before: --lr 1e6 applied step 1 (finite weights of 1e11), every later checkpoint held them, and each advised
    --resume skipped more steps until one printed `done`. Now a checkpoint beyond WEIGHT_BOUND is never written, and
    the advice (--overwrite when the run has no healthy checkpoint, else --resume) finishes a run that trained."""
    fresh = [*command("pretrain", tiny_model, world, tmp_path / "fresh"), "--save-every", 2]
    refused(cli(*fresh, "--lr", 1e6), "the weights blew up", "beyond 10000; step 2 was not saved; this run has no "
            "healthy checkpoint; lower --lr and start again with the same command plus --overwrite", alone=False)
    assert not (tmp_path / "fresh" / "run" / "checkpoints").exists()
    run = Path(shutil.copytree(resumable, tmp_path / "run"))  # a healthy step 2, then a blow-up
    args = [*command("pretrain", tiny_model, world, tmp_path), "--save-every", 2]
    refused(cli(*args, "--resume", "--lr", 1e6), "step 4 was not saved; the last healthy checkpoint is "
            f"{run / 'checkpoints' / 'step-0000002'}; lower --lr and continue with the same command plus --resume",
            alone=False)
    for advised, folder in ((fresh + ["--overwrite"], tmp_path / "fresh" / "run"), (args + ["--resume"], run)):
        ok(cli(*advised))
        assert json.loads((folder / "results.json").read_text())["training"]["skipped_steps"] == 0
    old = Path(shutil.copytree(resumable, tmp_path / "old" / "run"))  # saved before checkpoints were checked
    weights = old / "checkpoints" / "step-0000002" / "model.safetensors"
    save_file({k: v * 1e6 for k, v in load_file(weights).items()}, weights)
    refused(cli(*command("pretrain", tiny_model, world, tmp_path / "old"), "--save-every", 2, "--resume"),
            "step-0000002: the weights blew up", "saved before checkpoints were checked", "--overwrite", alone=False)


def test_a_damaged_align_reference_is_rebuilt_on_resume(world, tiny_model, tmp_path, monkeypatch):
    """align's reference.npz records the checksums of its arrays and of what it was made from: truncated or zeroed
    (before: a BadZipFile or ValueError traceback on --resume) or edited, it is computed again from the start model,
    with a warning naming it, and equals the original. (Training, which follows, is stopped at once: fast.)"""
    import extras.align as align
    references = []

    def stop(model, data, *args, **kwargs):
        references.append(np.array(data.reference))
        raise KeyboardInterrupt

    monkeypatch.setattr(align, "train", stop)
    args = ["align", "--domain", "games", "--users", 16, "--negatives", "random", "--k", 1, "--val-users", 2,
            "--test-users", 2, "--no-progress", "--precision", "fp32", "--data", world, "--model", tiny_model,
            "--out", tmp_path / "run"]
    assert cli(*args)[0] == 130
    (tmp_path / "run" / "latest").write_text("step-0000001\n")  # as if its first checkpoint were saved
    saved = tmp_path / "run" / "reference.npz"
    good = dict(np.load(saved))
    edited = {**good, "logps": good["logps"] + 1}  # a valid archive whose checksum no longer matches
    for damage in (truncate, lambda d: bytes(len(d)), lambda d: np.savez(saved, **edited) or saved.read_bytes()):
        saved.write_bytes(damage(saved.read_bytes()))
        code, output = cli(*args, "--resume")
        assert code == 130 and f"warning: {saved}: " in output and "computing the reference again" in output, output
        assert all(np.array_equal(np.load(saved)[k], v) for k, v in good.items())
        assert np.array_equal(references[-1], references[0])
    code, output = cli(*args, "--resume")  # intact: used as it is
    assert code == 130 and "computing the reference again" not in output, output
    assert np.array_equal(references[-1], references[0])


@pytest.mark.skipif(resource is None, reason="no file-size limit (not POSIX)")
def test_full_disk_while_the_token_cache_is_built_names_it_and_leaves_nothing(tiny_model, data_copy):
    """The cache is written with plain writes, not through a writable memory map: a disk that fills up (here a
    file-size limit, EFBIG) is an OSError naming the cache (one line from the CLI), not a SIGBUS, and no temporary
    file is left behind."""
    ds, encoder = load_dataset(data_copy), Encoder(Tokenizer.from_pretrained(tiny_model))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes past it fail, EFBIG
    try:
        with pytest.raises(OSError) as failed:
            cpt_stream(ds, encoder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG and failed.value.filename.startswith(str(data_copy / "cache" / "cpt-"))
    assert not list((data_copy / "cache").iterdir())


@pytest.fixture(scope="session")
def resumable(world, tiny_model, tmp_path_factory):
    """A pretrain run of 4 steps as if killed after its step-2 checkpoint: only step 2 saved, nothing finished."""
    root = tmp_path_factory.mktemp("resumable")
    code, output = cli(*command("pretrain", tiny_model, world, root), "--save-every", 2)
    assert code == 0, output
    run = root / "run"
    for name in ("final", "checkpoints/step-0000004"):
        shutil.rmtree(run / name)
    (run / "results.json").unlink()
    (run / "latest").write_text("step-0000002\n")
    return run


CHECKPOINT_FILES = ["latest", "run_config.json", "checkpoints/step-0000002/config.json",
                    "checkpoints/step-0000002/model.safetensors", "checkpoints/step-0000002/state.pt"]


@pytest.mark.parametrize("file, fault", [(file, fault) for file in CHECKPOINT_FILES for fault in FAULTS])
def test_broken_checkpoint_on_resume(file, fault, resumable, world, tiny_model, tmp_path):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    inject(run / file, fault)
    code, output = cli(*command("pretrain", tiny_model, world, tmp_path), "--save-every", 2, "--resume")
    assert "Traceback" not in output, output
    if code == 0:  # a file resume does not need (the checkpoint's config.json; `latest`: the newest is found)
        assert file.endswith("config.json") or file == "latest", output
        assert (run / "final" / "model.safetensors").exists() and (run / "results.json").exists()
    else:  # the run's printed plan, then one line naming what is broken
        last = output.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: "), output
        assert Path(file).name in last or "step-0000002" in last, last


def test_broken_hf_tokenizer_json(model_copy, world, tmp_path):
    pytest.importorskip("tokenizers")
    (model_copy / "tokenizer.model").unlink()
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nothing"')
    refused(cli(*command("evaluate", model_copy, world, tmp_path)), "tokenizer.json: not a Hugging Face tokenizer")


@pytest.mark.parametrize("index, fragments", [
    ('{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}',
     ["model-00001-of-00002.safetensors: not a readable safetensors file"]),
    ("[]", ["model.safetensors.index.json: no weight_map"]),
    ("{", ["model.safetensors.index.json: not valid JSON"]),
])
def test_broken_sharded_index(index, fragments, model_copy, world, tmp_path):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text(index)
    refused(cli(*command("evaluate", model_copy, world, tmp_path)), *fragments)


def test_model_folder_that_is_a_file(tmp_path, world):
    (tmp_path / "file").write_text("x")
    refused(cli(*command("evaluate", tmp_path / "file", world, tmp_path)), "config.json: cannot read it")


# --------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("args, fragments", [
    (["--users", -3], ["--users -3: expected 0 (all users) or a positive number"]),
    (["--beams", 0], ["--beams 0: must be at least the largest K (20)"]),
    (["--window", 0], ["--window 0: expected a positive number"]),
    (["--split", "train"], ["--split 'train': expected test or valid"]),
    (["--k", 5], ["No such option: --k", "evaluate --help"]),
    (["--users", "abc"], ["Invalid value for '--users'"]),
    (["--domain", "gamez"], ["unknown domain 'gamez'", "known: books, movies"]),
])
def test_evaluate_options(args, fragments, tiny_model, world, tmp_path):
    refused(cli(*command("evaluate", tiny_model, world, tmp_path), *args), *fragments)
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("args, fragments", [
    (["recommend", "--domain", "games", "--model", "M", "--user", "u00001", "--window", -1], ["--window -1"]),
    (["recommend", "--domain", "games", "--model", "M", "--user", "u00001", "-k", 0], ["--k 0: expected at least"]),
    (["recommend", "--domain", "games", "--model", "M", "--input", "DIR", "--output", "OUT/r.jsonl"],
     ["--input", "is a directory"]),
    (["recommend", "--domain", "games", "--model", "M", "--history", "x" * 10000], ["title 'xxx", "...", "closest"]),
    (["pretrain", "--model", "M", "--out", "OUT/run", "--tokens", 256, "--block-len", 32, "--micro-batch", 4,
      "--batch-tokens", 128, "--warmup", 50], ["--warmup 50: more steps than the run's 2"]),
    (["reproduce", "--model", "M", "--out", "OUT/r", "--sft-epochs", 0], ["--sft-epochs 0.0: expected a value > 0"]),
    (["reproduce", "--model", "M", "--out", "OUT/r", "--cpt-tokens", -1], ["--cpt-tokens -1: expected a value > 0"]),
    (["init", "--out", "OUT/m", "--vocab", 40], ["--vocab 40: too small for the characters", "at least"]),
    (["prepare", "synthetic", "--out", "OUT/w", "--users", 0], ["--users 0: expected a positive"]),
])
def test_options_are_checked_before_any_work(args, fragments, tiny_model, world, tmp_path):
    (tmp_path / "dir").mkdir()
    args = [{"M": tiny_model, "DIR": tmp_path / "dir"}.get(a, a) for a in args]
    args = [str(a).replace("OUT", str(tmp_path / "out")) for a in args]
    line = refused(cli(*args, *([] if args[0] == "prepare" else ["--data", world])), *fragments, alone=False)
    assert len(line) < 400 and not (tmp_path / "out").exists()  # a 10,000-character title is quoted in 80


def test_a_domain_without_validation_users_is_refused_before_training(tiny_model, tmp_path):
    """Before: finetune trained, then found no validation case to choose its checkpoint by."""
    items = {"b1": ("books", "Red Dragon Tales"), "b2": ("books", "Jazz Poems"), "b3": ("books", "Star Diaries"),
             "g1": ("games", "Red Dragon Quest"), "g2": ("games", "Jazz Arena")}
    interactions = [("u1", "b1", 1), ("u1", "b2", 2), ("u1", "b3", 3), ("u2", "g1", 1), ("u2", "g2", 2),
                    ("u3", "g2", 1), ("u3", "g1", 2)]  # 2 games each: training items only
    write_dataset(tmp_path / "d", source="test", domains=[Domain("books", "Books", "pretrain"),
                                                        Domain("games", "Video Games", "downstream")],
                  items=items, interactions=interactions)
    refused(cli("finetune", "--domain", "games", "--data", tmp_path / "d", "--model", tiny_model, "--out",
                tmp_path / "run", "--no-progress"), "domain 'games' has no validation cases")
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line(tmp_path):
    refused(cli("frobnicate"), "No such command 'frobnicate'")
    refused(cli("evaluate", "--domain", "games"), "Missing option '--model'")
    assert cli("evaluate", "--help")[0] == 0


# --------------------------------------------------------------------------------------------------- prepare sources
def recbole_source(root: Path) -> Path:
    source = root / "tiny"
    source.mkdir()
    rows = [f"u{u}\ti{(u + k) % 6}\t{k}.0" for u in range(5) for k in range(4)]
    (source / "tiny.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    (source / "tiny.item").write_text("item_id:token\ttitle:token_seq\n" +
                                      "".join(f"i{i}\tMovie number {i}\n" for i in range(6)))
    return source


def amazon_source(root: Path) -> Path:
    source = root / "amazon"
    source.mkdir()
    reviews = [{"user_id": f"u{u}", "parent_asin": f"A{(u + k) % 6}", "timestamp": 1000 * k}
               for u in range(5) for k in range(4)]
    (source / "Toys.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (source / "meta_Toys.jsonl").write_text("".join(json.dumps({"parent_asin": f"A{i}", "title": f"Toy {i}"}) + "\n"
                                                    for i in range(6)))
    return source


PREPARE = {  # name -> (source maker, its files, command line without --out)
    "recbole": (recbole_source, ["tiny.inter", "tiny.item"], lambda s: ["prepare", "recbole", s]),
    "amazon2023": (amazon_source, ["Toys.jsonl", "meta_Toys.jsonl"],
                   lambda s: ["prepare", "amazon2023", s, "--categories", "Toys"]),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name, file", [(n, f) for n, (_, files, _) in PREPARE.items() for f in files])
def test_broken_prepare_source(name, file, fault, tmp_path):
    """Lenient by design (malformed lines are counted), so cut and damaged lines are errors only with --strict. A
    TSV row cut short is still a row (RecBole): only the JSON sources can tell a truncated file."""
    if (name, fault) == ("recbole", "truncated"):
        pytest.skip("a RecBole row cut after its last tab is well-formed")
    make, _, args = PREPARE[name]
    source = make(tmp_path)
    inject(source / file, fault)
    strict = ["--strict"] if fault in ("truncated", "corrupted") else []
    refused(cli(*args(source), "--out", tmp_path / "out", *strict), file)
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_source(tmp_path):
    """A .gz cut short raises EOFError, which click would report as "Aborted!" (a Ctrl-C), naming no file."""
    import gzip
    source = amazon_source(tmp_path)
    data = gzip.compress((source / "Toys.jsonl").read_bytes())
    (source / "Toys.jsonl").unlink()
    (source / "Toys.jsonl.gz").write_bytes(truncate(data))
    refused(cli(*PREPARE["amazon2023"][2](source), "--out", tmp_path / "out"), "Toys.jsonl.gz")


def test_prepare_sources_are_valid(tmp_path):
    """The sources above convert cleanly, so each fault is what the test above refuses."""
    for name, (make, _, args) in PREPARE.items():
        (tmp_path / name).mkdir()
        code, output = cli(*args(make(tmp_path / name)), "--out", tmp_path / name / "out", "--strict")
        assert code == 0 and (tmp_path / name / "out" / "manifest.json").exists(), output


# --------------------------------------------------------------------------------------------------- outputs
def foreign(path: Path, file: bool = False) -> Path:
    """Something of the user's at `path`: a folder holding a file, or a file."""
    if file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not yours")
        return path
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("not yours")
    return path


def untouched(path: Path) -> bool:
    return (path.read_text() if path.is_file() else (path / "keep.txt").read_text()) == "not yours"


def writer(name: str, model: Path, data: Path, out: Path) -> list:
    """Every command that writes, with the smallest settings, writing `out`."""
    if name in ("pretrain", "finetune", "reproduce", "init", "evaluate"):
        args = command(name, model, data, out.parent)
        args[args.index("--out") + 1] = out
        return args
    return {
        "baseline": ["baseline", "--domain", "games", "--data", data, "--out", out, "--epochs", 1, "--dim", 8,
                     "--max-len", 8, "--no-progress"],
        "recommend": ["recommend", "--domain", "games", "--model", model, "--data", data, "--input", INPUT,
                      "--output", out, "--no-progress"],
        "prepare": ["prepare", "synthetic", "--users", 20, "--out", out],
    }[name]


WRITERS = ["prepare", "init", "pretrain", "finetune", "baseline", "evaluate", "recommend", "reproduce"]
FILES = {"evaluate", "recommend"}  # their --out is a file
INPUT = Path("histories.jsonl")  # recommend's input, written by each test in its folder (see histories())


@pytest.fixture
def histories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    INPUT.write_text('{"id": 1, "items": []}\n')


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name", WRITERS)
def test_a_foreign_out_is_never_replaced(name, overwrite, tiny_model, world, tmp_path, histories):
    """With or without --overwrite, given directly or through a symbolic link: refused, nothing of the user's
    touched."""
    out = foreign(tmp_path / "mine", file=name in FILES)
    link = tmp_path / "link"
    link.symlink_to(out)
    for target in (out, link):
        refused(cli(*writer(name, tiny_model, world, target), *["--overwrite"] * overwrite),
                "is not a" if name not in FILES else "written by this project", alone=name != "reproduce")
        assert untouched(out) and link.is_symlink()


@pytest.mark.parametrize("name", ["prepare", "init", "pretrain", "evaluate", "recommend"])
def test_own_output_behind_a_symbolic_link_is_replaced_in_place(name, tiny_model, world, tmp_path, histories):
    real, link = tmp_path / "real", tmp_path / "link"
    link.symlink_to(real, target_is_directory=name not in FILES)
    ok(cli(*writer(name, tiny_model, world, real)))
    refused(cli(*writer(name, tiny_model, world, link)), "already", "--overwrite")
    ok(cli(*writer(name, tiny_model, world, link), "--overwrite"))
    assert link.is_symlink() and real.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name != "histories"
                                                          ".jsonl" and not p.name.startswith("real-")) == ["link",
                                                                                                          "real"]


@pytest.mark.parametrize("name", ["pretrain", "finetune", "baseline"])
def test_a_run_inside_the_dataset_is_refused(name, tiny_model, data_copy, tmp_path):
    refused(cli(*writer(name, tiny_model, data_copy, data_copy / "run")), f"inside {data_copy}", alone=False)
    assert not (data_copy / "run").exists()


@pytest.mark.parametrize("name", WRITERS)
def test_an_unwritable_out_is_one_line(name, tiny_model, world, tmp_path, histories, monkeypatch):
    """A read-only, immutable or another user's folder (os.access says no): one line naming it, before any work."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path / "ro" else
                        real(path, mode, **kw))
    (tmp_path / "ro").mkdir()
    refused(cli(*writer(name, tiny_model, world, tmp_path / "ro" / "out")), f"{tmp_path / 'ro'}: not writable")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOSPC])
def test_a_write_that_fails_midway_is_one_line(error, tiny_model, world, tmp_path, monkeypatch):
    """The folder looked writable, the write failed (an immutable file, a full disk): one line naming the file."""
    monkeypatch.setattr("extras.init.write_json", lambda path, obj: (_ for _ in ()).throw(
        OSError(error, os.strerror(error), str(path))))
    line = refused(cli(*writer("init", tiny_model, world, tmp_path / "m")), "cannot be written", alone=False)
    assert os.strerror(error) in line


def test_evaluate_never_replaces_another_commands_result(tiny_model, world, tmp_path):
    """Before: pointed at a fine-tuning run's results.json, evaluate replaced it and its per-user ranks."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"protocol": "full ranking", "model": {}, "config": {"command": "finetune"}}))
    refused(cli(*writer("evaluate", tiny_model, world, results), "--overwrite"), "is not a result of evaluate")
    assert json.loads(results.read_text())["config"] == {"command": "finetune"}


@pytest.mark.parametrize("target", ["input", "items"])
def test_recommend_never_replaces_its_input_or_a_dataset_file(target, tiny_model, data_copy, tmp_path, histories):
    out = INPUT if target == "input" else data_copy / "items.jsonl"
    before = out.read_text()
    refused(cli(*writer("recommend", tiny_model, data_copy, out), "--overwrite"))
    assert out.read_text() == before


@pytest.mark.parametrize("name", ["synthetic", "recbole", "amazon2023"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_foreign_out_is_never_deleted(name, overwrite, tmp_path):
    out = foreign(tmp_path / "out")
    args = ["prepare", "synthetic", "--users", 30] if name == "synthetic" else PREPARE[name][2](
        PREPARE[name][0](tmp_path))
    refused(cli(*args, "--out", out, *["--overwrite"] * overwrite), str(out))
    assert (out / "keep.txt").read_text() == "not yours"


def test_init_replaces_only_its_own_model(world, tmp_path):
    """Issue 1: init --out replaced a non-empty foreign directory (exit 0)."""
    args = command("init", None, world, tmp_path)
    assert cli(*args)[0] == 0
    model = tmp_path / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["cprec_init"] == {"seed": 0, "fresh": True} and written_by_init(model)
    refused(cli(*args), "a model already exists there; pass --overwrite")
    before = (model / "model.safetensors").read_bytes()
    assert cli(*args, "--overwrite", "--seed", 1)[0] == 0
    assert (model / "model.safetensors").read_bytes() != before and sorted(os.listdir(tmp_path)) == ["model"]
    (model / "notes.txt").write_text("mine")  # a user's file in it: no longer only init's output
    refused(cli(*args, "--overwrite"), "is not a model written by this project")
    assert (model / "notes.txt").exists()


def test_trained_models_keep_the_lineage_but_are_no_longer_inits_to_replace(tiny_model, tmp_path):
    """The marker tells init's output apart: a model saved after training keeps its lineage (seed), not "fresh"."""
    net = Decoder.from_pretrained(tiny_model)
    assert net.config.extra["cprec_init"] == {"seed": 0, "fresh": True}
    net.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["cprec_init"] == {"seed": 0}
    assert not written_by_init(tmp_path / "trained") and written_by_init(tiny_model)


# --------------------------------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_deletes_nothing_foreign_and_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    lookalike = tmp_path / f".ckpt.tmp{os.getpid()}"  # the old fixed temporary name: it was rmtree'd first
    foreign(lookalike)
    for version in ("one", "two"):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text(version)
    assert (target / "v").read_text() == "two" and (lookalike / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lookalike.name, "ckpt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "v").write_text("three")
        raise RuntimeError("crash while writing")
    assert (target / "v").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [lookalike.name, "ckpt"]


def test_atomic_dir_removes_leftovers_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = foreign(tmp_path / f".ckpt.tmp{dead_pid}-0123abcd")
    stale_old = foreign(tmp_path / f".ckpt.old{dead_pid}-89abcdef")
    live = foreign(tmp_path / f".ckpt.tmp{os.getpid()}-deadbeef")  # this process may still be writing it
    other = foreign(tmp_path / f".other.tmp{dead_pid}-0123abcd")  # another path's
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "v").write_text("x")
    assert not stale.exists() and not stale_old.exists() and live.exists() and other.exists()


def test_atomic_dir_restores_the_old_directory_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".ckpt.tmp"):  # the new version cannot be moved in; the old one can move back
            raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "v").write_text("new")
    assert (target / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_leaves_nothing_when_path_cannot_be_moved(tmp_path):
    """Outside its contract (a file at `path`) it fails, and leaves neither temporary directory behind."""
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(OSError), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "v").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (tmp_path / "ckpt").read_text() == "a file"



@pytest.mark.parametrize("sibling", ["directory", "file"])
def test_evaluates_per_user_file_is_guarded_like_its_result(sibling, tiny_model, world, tmp_path):
    """Before: a directory there was a traceback after the whole evaluation; a user's file there was replaced."""
    ranks = tmp_path / "e-per_user.jsonl"
    foreign(ranks, file=sibling == "file")
    for extra in ([], ["--overwrite"]):
        refused(cli(*writer("evaluate", tiny_model, world, tmp_path / "e.json"), *extra), "e-per_user.jsonl")
        assert untouched(ranks) and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--history", "x", "--user", "u00001"], ["--history and --user: give one"]),
    (["--input", "IN", "--output", "EMPTY", "--overwrite"], ["--output", "is not a recommendation file"]),
])
def test_recommend_refusals_name_the_right_option(args, fragments, tiny_model, world, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "items": []}\n')
    (tmp_path / "empty.jsonl").write_text("{}\n")  # a user's file, not an earlier output
    args = [{"IN": tmp_path / "in.jsonl", "EMPTY": tmp_path / "empty.jsonl"}.get(a, a) for a in args]
    refused(cli("recommend", "--domain", "games", "--model", tiny_model, "--data", world, *args), *fragments)
    assert (tmp_path / "empty.jsonl").read_text() == "{}\n"


def test_recommend_input_ids_must_be_strings_or_integers(tiny_model, world, tmp_path):
    (tmp_path / "in.jsonl").write_text('\ufeff{"id": 3, "items": []}\n{"id": NaN, "items": []}\n'
                                       '{"id": {"a": 1}, "items": []}\n')  # a BOM first, as some editors write
    code, output = cli("recommend", "--domain", "games", "--model", tiny_model, "--data", world, "--input",
                       tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--no-progress")
    assert code == 0 and "skipped 2 malformed line(s) of 3" in output
    assert '"id" must be a string or an integer' in output
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [3]


@pytest.mark.parametrize("args, fragment", [
    (["--domain", "books"], "--domain 'books' is a pre-training domain"),
    (["--model", "nowhere"], "--model nowhere: no checkpoint there"),
])
def test_reproduce_refuses_a_pretraining_domain_and_a_missing_model(args, fragment, tiny_model, world, tmp_path):
    base = ["reproduce", "--data", world, "--out", tmp_path / "r", "--model", tiny_model]
    refused(cli(*base, *args), fragment)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------- round 4
@pytest.mark.parametrize("where", ["inside", "holding"])
@pytest.mark.parametrize("name", ["pretrain", "finetune", "evaluate", "recommend", "reproduce"])
def test_an_output_inside_or_holding_its_model_is_refused(name, where, model_copy, world, tmp_path, histories):
    """With --overwrite too: an --out that holds the model (its run folder) or lies inside it (a checkpoint folder)
    is refused before any work, and the model is left as it was."""
    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    out = model_copy / ("sub.json" if name in FILES else "sub") if where == "inside" else model_copy.parent
    line = refused(cli(*writer(name, model_copy, world, out), "--overwrite"), alone=name != "reproduce")
    assert ("inside" if where == "inside" else "would replace the input") in line
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before


def test_overwrite_replaces_only_a_run_of_the_same_command(world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"command": "pretrain"}))
    refused(cli(*writer("baseline", None, world, run), "--overwrite"), "holds a run of `pretrain`, not of `baseline`")
    assert json.loads((run / "run_config.json").read_text()) == {"command": "pretrain"}


def test_a_finished_run_is_reused_only_when_made_the_same(tiny_model, tmp_path):
    """reproduce --resume: another budget, or a model replaced since (`init --overwrite`), is refused by name."""
    from extras.reproduce import Made, settings_of
    from infra.weights import model_fingerprint
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    args = ["pretrain", "--model", str(model), "--out", str(tmp_path / "cpt"), "--tokens", "8000"]
    made = Made(tmp_path, "data-1", resume=False)
    made.record(args, tmp_path / "cpt" / "results.json")
    again = Made(tmp_path, "data-1", resume=True)
    again.check(args, tmp_path / "cpt" / "results.json")  # the same: reused
    with pytest.raises(Exception, match="--tokens 8000 \\(now 12000\\)"):
        again.check([*args[:-1], "12000"], tmp_path / "cpt" / "results.json")
    fingerprint = model_fingerprint(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x00\x40"  # one weight changed, the size not: the last sampled block sees it
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model) != fingerprint
    with pytest.raises(Exception, match="--model's content changed"):
        again.check(args, tmp_path / "cpt" / "results.json")
    settings = {"data_fingerprint": "d", "model": "m", "model_fingerprint": fingerprint, "domain": "games",
                "cpt_tokens": 1, "sft_epochs": 1, "seed": 0, "seeds": 1, "core": False, "test_users": 0,
                "val_users": None}
    settings_of(tmp_path, settings, resume=False)
    with pytest.raises(Exception, match="--model's content"):
        settings_of(tmp_path, {**settings, "model_fingerprint": "other"}, resume=True)


@pytest.mark.parametrize("writer_fails", ["torch.save", "safetensors"])
def test_a_full_file_size_limit_during_a_write_names_the_file(writer_fails, tmp_path):
    """torch.save says only "unexpected pos" when the file-size limit (or a full disk) stops it: atomic_dir names
    the target and the errno, so the CLI prints one line."""
    script = ("import sys, torch\nfrom pathlib import Path\nfrom safetensors.torch import save_file\n"
              "from infra.files import atomic_dir\ntarget = Path(sys.argv[1])\ntry:\n"
              "    with atomic_dir(target) as tmp:\n"
              f"        {'torch.save' if writer_fails == 'torch.save' else 'save_file'}"
              "({'w': torch.zeros(100_000)}, str(tmp / 'f'))\n"
              "except OSError as e:\n    print(e.errno, e.filename)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], preexec_fn=lambda: __import__("resource").setrlimit(
                              __import__("resource").RLIMIT_FSIZE, (50_000, 50_000)))
    assert done.stdout.split() == [str(errno.EFBIG), str(tmp_path / "ckpt")], done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_write_failure_advice_fits_the_moment(tmp_path):
    from infra.cli import write_failure
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    full = lambda path: OSError(errno.ENOSPC, "No space left on device", str(path))  # noqa: E731
    assert write_failure(full(tmp_path / "data" / "x"), errno.ENOSPC, "full").endswith("run the same command again")
    assert write_failure(full(run / "final"), errno.ENOSPC, "full").endswith("with --resume")
    assert "a file" not in write_failure(RuntimeError("disk"), errno.ENOSPC, "full")


@pytest.mark.parametrize("name", ["pretrain", "evaluate", "init"])
def test_a_path_too_long_is_refused_before_any_work(name, tiny_model, world, tmp_path):
    out = tmp_path / ("x" * 256 + (".json" if name in FILES else ""))
    refused(cli(*writer(name, tiny_model, world, out)), "too long for this file system")


def test_a_closed_stdout_is_dropped_quietly(tmp_path):
    from infra.cli import ReaderGone
    read, write = os.pipe()
    os.close(read)
    stream = ReaderGone(os.fdopen(write, "w"))
    stream.write("x" * 100_000)  # more than the buffer: the write itself meets the closed pipe
    stream.flush()
    stream.write("more")
    stream.flush()
