"""What every command shares: the options several commands take, the results table, and `main`, which turns every
error a user can cause into one line on stderr with exit status 2 (never a traceback or a usage box)."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.console import say
from infra.distributed import end_distributed
from infra.files import UserError, release_locks, write_error
from infra.runs import Interrupted, has_checkpoint

console = Console()
clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or the copy newer typers vendor

PROGRESS = typer.Option(True, help="Show progress bars with ETA (on a terminal only).")
PRECISION = typer.Option("auto", help="auto (bf16 where supported, else fp16 on CUDA, fp32 on CPU), fp32, bf16, "
                         "fp16 (with a loss scaler; slow on CPU).")
RESUME = typer.Option(False, help="Continue the run in --out from its latest checkpoint, exactly.")
OVERWRITE = typer.Option(False, help="Replace a run already in --out.")
TRACKER = typer.Option("none", help="Also log each step and validation to an experiment tracker (metrics.jsonl is "
                       "written anyway): none, tensorboard (pip install tensorboard; watch with `tensorboard --logdir "
                       "OUT`) or wandb (pip install wandb; WANDB_MODE=offline writes OUT/wandb without a network). May "
                       "change on --resume; the run continues the same curves.")


def positive(**options) -> None:
    """Refuse counts and amounts that must be > 0 (None = not given), naming the option."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a value > 0")


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def show(result: dict) -> None:
    """An evaluation result as a table (the model beside popularity) and its protocol line."""
    keys = [k for k in result["model"] if k != "mrr"] + ["mrr"]
    table = Table("ranker", *[k.replace("recall", "R").replace("ndcg", "N").upper() for k in keys])
    for name, label in (("model", "model"), ("model_valid_only", "valid only"), ("popularity", "popularity")):
        if name in result:  # valid only: the model's list with generated titles that are no item dropped
            table.add_row(label, *[f"{result[name][k]:.4f}" for k in keys])
    console.print(table)
    if "valid" in result:
        console.print("catalogue items among the top-K: " + ", ".join(f"{share:.1%} {at}" for at, share in
                                                                      result["valid"].items()), highlight=False)
    console.print(f"protocol: {result['protocol']}", highlight=False, soft_wrap=True)
    if "top10" in result:
        console.print(f"top-10: {result['top10']['coverage']:.1%} of the catalogue recommended to someone, mean "
                      f"popularity percentile {result['top10']['popularity_percentile']:.2f}", highlight=False)
    console.print(f"{result['users_per_s']:.1f} users/s", highlight=False)


def main(app: typer.Typer) -> None:
    """Run a command; bad input of any kind (a file, a record, an option, a misspelt option, an output that cannot be
    written) ends as one line on stderr and exit status 2; an interrupted command (Ctrl-C or SIGTERM; a training run
    saves its checkpoint first) says so and exits 130."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM outside training: as Ctrl-C
    interrupt = signal.getsignal(signal.SIGINT)
    code, stdout = None, sys.stdout
    sys.stdout = ReaderGone(stdout)
    try:
        code = app(standalone_mode=False) or 0  # --help returns 0 here; click's own error boxes are ours below
        if code == 0:  # the work is saved: a Ctrl-C from now on changes nothing, so it is ignored (exit 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if code == 130:  # typer's answer to a KeyboardInterrupt (Ctrl-C, SIGTERM) outside training: say so
            say("[yellow]interrupted")
        sys.exit(code)
    except getattr(clicks, "NoArgsIsHelpError", ()) as e:  # click >= 8.2
        e.show()  # `cprec.py` or `cprec.py prepare` alone: the help text, as before
        sys.exit(e.exit_code)
    except clicks.ClickException as e:
        command = e.ctx.command_path if getattr(e, "ctx", None) else Path(sys.argv[0]).name
        fail(f"{e.format_message()} (see `{command} --help`)")
    except typer.Abort as e:  # Ctrl-C outside training (which saves and exits 130 itself)
        if isinstance(e.__cause__, EOFError):
            raise e.__cause__ from None  # click takes any EOFError for a closed prompt; here a file was cut short
        say("[yellow]interrupted")
        sys.exit(130)
    except Interrupted as stop:
        say(f"[yellow]{escape(str(stop))}")
        sys.exit(130)
    except KeyboardInterrupt:  # outside click's own handling (before a command starts)
        say("[yellow]interrupted")
        sys.exit(130)
    except UserError as e:
        fail(str(e))
    except Exception as e:  # a full disk, a read-only or immutable folder, permissions: the one line a user can act on
        if (failed := write_error(e)) is None:
            raise
        fail(write_failure(e, *failed))
    finally:
        release_locks()
        end_distributed(clean=code == 0)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, interrupt)
        sys.stdout.flush()  # what is still buffered, while a closed reader is still handled
        sys.stdout = stdout


class ReaderGone:
    """stdout whose reader may leave (`cprec.py ... | head -1`): from then on its output is dropped, quietly, and the
    work goes on to its own exit status."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.gone()

    def gone(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the buffered rest, and all to come, go to /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def write_failure(e: Exception, number: int, text: str) -> str:
    """The one line for a failed write: the file, why, and what to do now (--resume only where a run holds a
    checkpoint to resume from)."""
    name = getattr(e, "filename", None) or getattr(e, "filename2", None)
    where = f"{name}: cannot be written" if name else f"writing failed ({type(e).__name__}: {str(e)[:120]})"
    runs = [p for p in Path(name).parents if (p / "run_config.json").is_file()] if name else []
    again = "run the same command again" + (" with --resume" if runs and has_checkpoint(runs[0]) else "")
    if number == errno.EFBIG:
        return f"{where} ({text}: the file-size limit, ulimit -f, or the file system's largest file); raise the " \
               f"limit or write elsewhere, then {again}"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return f"{where} ({text}); free some space, then {again}"
    return f"{where} ({text}); choose an output folder you can write"


def fail(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)
