"""The `meshserve` console script: `meshserve <subcommand> --flags`.

Each subcommand module defines its absl flags only when chosen, so subcommands can use
the same flag names without clashing.
"""

from __future__ import annotations

import importlib
import sys
import time

from absl import app, flags

# When this process began (close enough: before any heavy import), for start-up timing.
PROCESS_START = time.monotonic()

SUBCOMMANDS = {
    "convert": ("convert", "convert a Hugging Face model or a GGUF file to a checkpoint"),
    "generate": ("generate", "generate text offline (or from a server with --target)"),
    "serve": ("serve", "serve a model over gRPC (streaming generation, health, metrics)"),
    "bench-serving": ("bench_serving", "load-test a running server (vLLM bench serve style)"),
    "bench-mesh": ("bench_mesh", "measure every layout that fits, pick the best for an SLO"),
    "bench-disagg": ("bench_disagg", "colocated vs prefill/decode slices, same devices"),
}

# Errors that mean "your input is wrong": print the message, no traceback, exit 2.
_USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def _usage() -> str:
    lines = ["usage: meshserve <subcommand> [--flags]", "", "subcommands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`meshserve <subcommand> --help` lists a subcommand's flags."]
    return "\n".join(lines)


def _normalize(arg: str) -> str:
    """Accept `--max-tokens` as well as absl's `--max_tokens`."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg[2:].partition("=")
    if name.startswith("no-"):  # absl spells boolean negation --nofoo
        name = "no" + name[3:]
    return "--" + name.replace("-", "_") + sep + value


def define_common_flags() -> None:
    flags.DEFINE_integer(
        "cpu_devices",
        None,
        "Simulate this many devices on the CPU backend (try any layout on a laptop).",
    )
    flags.DEFINE_string(
        "compilation_cache_dir",
        None,
        "Persistent XLA compilation cache: a second start loads its programs instead of "
        "compiling them (default: $MESHSERVE_COMPILATION_CACHE, else "
        "~/.cache/meshserve/xla; 'none' turns it off).",
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(f"meshserve: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"meshserve.tools.{SUBCOMMANDS[name][0]}")
    define_common_flags()
    module.define_flags()

    quiet = not any(a.startswith(("-v", "--v")) for a in argv[2:])

    def run(args: list[str]) -> int:
        from absl import logging

        from meshserve.meshes import enable_compilation_cache, set_cpu_device_count

        if quiet:  # Orbax logs every save/restore at INFO; -v / --verbosity brings it back.
            logging.set_verbosity(logging.WARNING)
        try:
            # A subcommand may need to act before any JAX backend exists (serve joins a
            # multi-process group with jax.distributed there).
            getattr(module, "init_runtime", lambda: None)()
            set_cpu_device_count(flags.FLAGS.cpu_devices)
            try:
                enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
            except OSError as e:  # an unusable directory: run, compiling everything
                print(f"meshserve {name}: warning: no compilation cache: {e}", file=sys.stderr)
            return module.main(args)
        except _USER_ERRORS as e:
            print(f"meshserve {name}: error: {e}", file=sys.stderr)
            return 2

    app.run(run, argv=[f"meshserve {name}", *map(_normalize, argv[2:])])


if __name__ == "__main__":
    main()
