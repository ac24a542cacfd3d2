"""The ``melbatch`` command: one table declares every command; the parser, ``--help`` and
``melbatch submit``'s jobs come from it.

A row names the command, its one-line help, the function that runs it and the one that declares its
arguments; the four job commands take their flags, help and YAML sections from their config classes
(:data:`melbatch.cli.options.JOBS`). A new command is one row here plus its two functions in
:mod:`.jobs` or :mod:`.looks`. Exit codes: 0 done; 2 wrong usage or config (nothing was started);
3 storage unreachable or unwritable; 4 too many inputs quarantined; 5 another scan holds OUT; 1 the
run itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import sys
import traceback
from collections.abc import Callable

from melbatch import __version__
from melbatch.cli import jobs, looks
from melbatch.cli.options import JOBS
from melbatch.config import ConfigError
from melbatch.console import set_verbose


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``melbatch`` command. Its ``--help`` description is ``run``'s docstring."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    defaults_in_help: bool = False  # argparse appends "(default: ...)" to every flag's help
    description: str | None = None

    @classmethod
    def job(cls, name: str, run: Callable[[argparse.Namespace], int]) -> Command:
        """A job command (also ``jobs/<name>.py`` for ``ray job submit``): its flags from its configs."""
        return cls(name, JOBS[name].help, run, JOBS[name].add_args, description=JOBS[name].description)

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.description or inspect.getdoc(self.run),
                           **({"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
                              if self.defaults_in_help else {}))
        self.arguments(p)
        p.set_defaults(func=self.run)


COMMANDS: tuple[Command, ...] = (  # in --help's order
    Command.job("featurize", jobs.cmd_featurize),
    Command.job("train", jobs.cmd_train),
    Command.job("classify", jobs.cmd_classify),
    Command.job("scan", jobs.cmd_scan),
    Command("results", "the current verdict for every object of a scanned archive",
            jobs.cmd_results, jobs.results_args),
    Command("detections", "the events detected in long recordings: one table for the archive, or Raven "
            "selection tables", jobs.cmd_detections, jobs.detections_args),
    Command("export", "a model package as one ONNX graph: mono audio in, probabilities out, the log-mel inside",
            jobs.cmd_export, jobs.export_args),
    Command("show", "waveform + log-mel spectrogram pictures of audio files, stored or classified clips (PNG)",
            looks.cmd_show, looks.show_args),
    Command("report", "a static HTML report of a featurize, train, classify or scan output",
            looks.cmd_report, looks.report_args),
    Command("review", "the clips a person should check: a page to look and listen, labels.csv for the answers",
            looks.cmd_review, looks.review_args),
    Command("similar", "search an archive by sound: the clips nearest a query (embeddings)",
            looks.cmd_similar, looks.similar_args),
    Command("discover", "an unlabelled archive's clips in groups that sound alike: a page to name whole groups, "
            "labels.csv to train from", looks.cmd_discover, looks.discover_args),
    Command("submit", "run a melbatch job on a Ray cluster (Ray Job Submission), following its logs",
            jobs.cmd_submit, jobs.submit_args),
    Command("sample-archive", "generate a labelled sample archive (engine or voice task)",
            looks.cmd_sample_archive, looks.sample_archive_args, defaults_in_help=True),
    Command("demo", "sample archive -> featurize -> fine-tune from ImageNet and from random weights -> classify "
            "new files, locally", looks.cmd_demo, looks.demo_args, defaults_in_help=True),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="melbatch",
        description="Classify large audio archives with image models on log-mel spectrograms, on Ray.",
        epilog="URIs: s3://bucket/prefix, a local path, file://..., memory://... . S3 endpoint and credentials "
               "come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID...), "
               "never from flags; retries and deadlines too: AWS_MAX_ATTEMPTS (4 per request), AWS_RETRY_MODE "
               "(adaptive), MELBATCH_S3_CONNECT_TIMEOUT_S (5), MELBATCH_S3_READ_TIMEOUT_S (60). Exit codes: 0 ok, "
               "1 run failed, 2 bad usage/config, 3 storage error (a store that kept failing: re-run to resume), "
               "4 classify finished with too many inputs quarantined, 5 another scan holds OUT.",
    )
    p.add_argument("--version", action="version", version=f"melbatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in COMMANDS:
        command.add_to(sub)
    return p


def no_space(e: BaseException) -> OSError | None:
    """The "no space left on device" error behind ``e`` (itself, its causes, or the error a Ray task
    raised), else ``None``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]  # RayTaskError.cause
    return None


def main(argv: list[str] | None = None) -> int:
    from melbatch.shards import DatasetError
    from melbatch.storage import StorageError, TransientStorageError

    args = parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"melbatch {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        hint = "; re-run the same command to resume" if isinstance(e, TransientStorageError) else ""
        print(f"melbatch {args.command}: storage error: {e}{hint}", file=sys.stderr)
        return 3
    except DatasetError as e:
        print(f"melbatch {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"melbatch {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: keep the traceback, end with what to do
        full = no_space(e)
        if full is not None:
            where = full.filename or getattr(args, "dst", None) or getattr(args, "out", None) or "an output"
            print(f"melbatch {args.command}: storage error: no space left on the device holding "
                  f"{where}: free space (or choose another output) and re-run the same "
                  "command to resume; finished batches are kept", file=sys.stderr)
            return 3
        traceback.print_exc()
        last = (str(e).strip().splitlines() or [""])[-1]
        print(f"\nmelbatch {args.command} failed: {type(e).__name__}: {last}\n"
              "Finished batches are kept: re-run the same command to resume. If it fails again, the "
              "traceback above says where.", file=sys.stderr)
        return 1

