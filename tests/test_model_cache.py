"""The GGUF -> safetensors cache: converted once, verified on reuse, rebuilt when damaged,
never left half-written."""

import json
import time

import pytest

from harness.models import loading as models


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF path whose 'conversion' writes small files, so cache mechanics run in milliseconds."""
    monkeypatch.setenv("LLM_HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "check_gguf", lambda path: {"architecture": "llama"})
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"weights" * 1000)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF-fake" * 100)
    return path, calls


def test_second_use_reuses_the_conversion(fake_gguf):
    path, calls = fake_gguf
    first = models.converted_gguf_dir(path, log=lambda *_: None)
    second = models.converted_gguf_dir(path, log=lambda *_: None)
    assert first == second and len(calls) == 1
    manifest = json.loads((first / models.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json"}


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_manifest", "delete_weights"])
def test_damaged_cache_is_rebuilt(fake_gguf, damage):
    path, calls = fake_gguf
    d = models.converted_gguf_dir(path, log=lambda *_: None)
    weights = d / "model.safetensors"
    if damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete_manifest":
        (d / models.MANIFEST).unlink()
    else:
        weights.unlink()
    messages = []
    rebuilt = models.converted_gguf_dir(path, log=messages.append)
    assert rebuilt == d and len(calls) == 2
    assert models._cache_is_valid(rebuilt)
    assert any("rebuilding" in m for m in messages) or damage == "delete_manifest"


def test_a_verified_file_is_hashed_again_only_after_it_changes(fake_gguf, monkeypatch):
    """Each process hashes a cached file once per state (size, mtime, ctime, inode): later loads of
    the same model skip the 540 MB hash, a write after the verification does not."""
    import os

    path, calls = fake_gguf
    d = models.converted_gguf_dir(path, log=lambda *_: None)
    hashed = []
    real_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda f: hashed.append(f.name) or real_sha256(f))
    for _ in range(3):
        assert models.converted_gguf_dir(path, log=lambda *_: None) == d
    assert sorted(hashed) == ["config.json", "model.safetensors"]  # once each, not three times
    weights = d / "model.safetensors"
    before = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: ctime still moves
    messages = []
    assert models.converted_gguf_dir(path, log=messages.append) == d
    assert len(calls) == 2 and any("rebuilding" in m for m in messages)


def test_failed_conversion_leaves_no_partial_cache(fake_gguf, monkeypatch):
    path, _ = fake_gguf

    def explode(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", explode)
    with pytest.raises(RuntimeError):
        models.converted_gguf_dir(path, log=lambda *_: None)
    root = models.cache_root()
    leftovers = [p.name for p in root.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_a_changed_gguf_gets_its_own_cache_entry(fake_gguf):
    path, calls = fake_gguf
    first = models.converted_gguf_dir(path, log=lambda *_: None)
    path.write_bytes(b"GGUF-other" * 100)
    second = models.converted_gguf_dir(path, log=lambda *_: None)
    assert first != second and len(calls) == 2


def test_default_model_cache_is_verified_and_fast_on_reuse(record_property):
    """The real embedded model: converted (once per machine), then loaded from safetensors."""
    import torch

    spec = models.resolve_model("smollm2-135m")[0]
    models.model_source_dir(spec)  # converts if this machine has not yet
    start = time.perf_counter()
    model = models.load_model(spec, device=torch.device("cpu"), dtype=torch.float32)
    models.load_tokenizer(spec)
    record_property("second_load_s", round(time.perf_counter() - start, 3))
    assert model.config.num_hidden_layers == 30
    assert models._cache_is_valid(models.converted_gguf_dir(models.default_gguf_path()))


def test_a_conversion_parses_each_gguf_once(monkeypatch):
    """transformers reads the GGUF header for the config, the tokenizer and the weights; inside
    _one_gguf_parse the three (and check_gguf) share one reader per file, and the class is restored."""
    import gguf

    made = []

    class CountingReader:
        def __init__(self, path, mode="r"):
            made.append(path)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    with models._one_gguf_parse():
        first, again, other = (gguf.GGUFReader(p) for p in ("/m/a.gguf", "/m/a.gguf", "/m/b.gguf"))
        llama = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is llama  # one map per architecture
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not llama
    assert first is again and first is not other and made == ["/m/a.gguf", "/m/b.gguf"]
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map


def test_a_gguf_header_is_read_once_per_file_state(tmp_path, monkeypatch):
    """check_gguf remembers a file's fields (the default model's header takes ~2.4 s to read) until
    the file changes; a caller editing the returned dict does not edit the memory."""
    reads = []
    monkeypatch.setattr(models, "_read_gguf_fields", lambda path: reads.append(path) or {"architecture": "llama"})
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" * 10)
    models.check_gguf(path)["architecture"] = "edited"
    assert models.check_gguf(path) == {"architecture": "llama"} and len(reads) == 1
    time.sleep(0.05)  # past the file system's timestamp granularity
    path.write_bytes(b"GGUF" * 11)
    models.check_gguf(path)
    assert len(reads) == 2
