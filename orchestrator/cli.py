"""`ensemble` command line: one subcommand per module, imported only when that subcommand runs.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; nothing heavy (torch, ray,
vllm) is imported until a command actually runs, so `ensemble --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-demo": ("experts.demo.build", "build the demo tokenizer, 4 domain experts and the generalist"),
    "demo-table": ("experts.demo.specialisation", "expert x domain perplexity table on held-out text"),
    "build-eval-split": ("experts.demo.independent", "build the independent held-out split of a demo build"),
    "train-gate": ("gating.train_cli", "score a corpus with every expert and fit the gate"),
    "eval": ("gating.evaluate_cli", "perplexity of experts, baselines and the gate on a JSONL file"),
    "serve": ("deploy.serve_cli", "start the Ray Serve application (gateway + experts) from a YAML config"),
    "export-log": ("orchestrator.export_log", "export the traffic log to Parquet"),
    "replay": ("deploy.replay", "send prompts (a file, or a demo traffic shift) to a running gateway"),
    "retrain": ("deploy.retrain_job", "retrain the gate from logged traffic and promote it if better"),
    "gate-history": ("gating.registry_cli", "list gate versions, or restore an earlier one"),
    "bench": ("deploy.bench", "side-by-side throughput and latency benchmark"),
    "soak": ("deploy.soak", "N streaming clients for T minutes: errors, logged rows and memory of the service"),
    "keys": ("orchestrator.keys.cli", "create, list and revoke API keys (scopes and per-key limits)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\nensemble: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    module, args = parse_command(argv[0], argv[1:])
    return int(module.run(args) or 0)


def parse_command(name: str, argv: list[str]):
    """-> (the command's module, its parsed arguments), exactly as `ensemble NAME ARGV...` would see them."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"ensemble {name}", description=help_text)
    module.add_arguments(sub)
    return module, sub.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())


class stdout_to_stderr:
    """Send everything written to fd 1 (including Ray's and vLLM's log lines) to stderr while a job runs,
    so that a command's `--json` output is the only thing on stdout."""

    def __enter__(self):
        import os

        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        return self

    def __exit__(self, *exc):
        import os

        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        return False
