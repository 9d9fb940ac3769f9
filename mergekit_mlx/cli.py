"""The `mergekit-mlx` command: one table of commands, each a module with its own parser and `main`.

A new command is a module with `HELP` and `main(argv) -> int` and one line in COMMANDS. Whatever a
command raises ends here: a user's error (recipe, input, output, flag) or an unforeseen one is one
paragraph on stderr and exit status 2, never a traceback (MERGEKIT_MLX_DEBUG=1 shows it).
"""

from __future__ import annotations

import importlib
import os
import sys

from .arguments import Parser
from .errors import MergeKitError

COMMANDS = {  # name -> module
    "run": "mergekit_mlx.run",
    "convert": "mergekit_mlx.convert",
    "eval": "mergekit_mlx.evaluate",
    "example": "mergekit_mlx.example",
    "evolve": "mergekit_mlx.evolve.command",
    "extract-lora": "mergekit_mlx.extract_lora",
    "lora-merge": "mergekit_mlx.lora_merge",
    "moe": "mergekit_mlx.moe.command",
}
# commands after which the process ends without the interpreter's teardown (see entry)
FAST_EXIT = {"run"}


def entry() -> None:
    """The console command: main(), then, after a merge, an exit without the interpreter's
    teardown. The output is closed and renamed by then; what is skipped is freeing every object and
    MLX's and the GPU driver's shutdown (a noticeable part of a GPU merge)."""
    code, command = dispatch(sys.argv[1:])
    if code == 0 and command in FAST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    return dispatch(list(sys.argv[1:] if argv is None else argv))[0]


def dispatch(argv: list[str]) -> tuple[int, str | None]:
    """(exit status, the command that ran)."""
    argv = list(argv)
    if argv and argv[0].endswith((".yml", ".yaml")):
        argv = ["run"] + argv  # `mergekit-mlx recipe.yml out` works like mergekit-yaml
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if command is None:
            _top_parser().parse_args(argv)  # --help, or an error naming the valid commands
            return 2, None
        module = importlib.import_module(COMMANDS[command])
        return module.main(argv[1:]) or 0, command
    except MergeKitError as e:
        return _error(str(e)), command
    except KeyboardInterrupt:
        print("mergekit-mlx: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130, command
    except SystemExit as e:  # --help
        return (e.code if isinstance(e.code, int) else 0), command
    except OSError as e:  # a file the checks did not foresee: still named, still one paragraph
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}"), command
    except MemoryError:
        return _error("out of memory; lower --batch-size, or merge on a machine with more memory"), command
    except Exception as e:
        if os.environ.get("MERGEKIT_MLX_DEBUG"):
            raise
        return _error(
            f"unexpected {type(e).__name__}: {_one_line(str(e))}. This is a bug in mergekit-mlx: please report it "
            "with the command and recipe (set MERGEKIT_MLX_DEBUG=1 to see where it happened)"
        ), command


def _top_parser() -> Parser:
    parser = Parser(prog="mergekit-mlx", description="Merge language models with MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, help=importlib.import_module(module).HELP, add_help=False)
    return parser


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error(message: str) -> int:
    print(f"mergekit-mlx: error: {_one_line(message, 4000)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    entry()
