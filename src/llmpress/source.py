"""The input model, read lazily: config, module tree on the meta device, tensors one at a time.

Nothing here loads the whole model. The module tree is built on the meta device so names and
classes resolve exactly as transformers would build them; tensors are read from the safetensors
files only when the runner asks for them.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from llmpress.errors import LlmpressError, first_line
from llmpress.experts import unfuse_experts

# Files copied unchanged from the input: tokenizer, chat template, generation settings.
PASSTHROUGH_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|.*\.model|chat_template\.(jinja|json)|generation_config\.json|preprocessor_config\.json)$"
)
# safetensors dtype names -> torch dtypes (the format's spec lists these); the writer and
# `inspect` use the same table.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local model directory, or a hub snapshot where the network allows."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LlmpressError(f"model {str(model)!r} is a file; pass the model's directory")
    if not _HUB_ID.match(str(model)):
        raise LlmpressError(f"model directory {str(model)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(model),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network, auth, missing repo: one message for all
        reason = first_line(exc)
        raise LlmpressError(
            f"{str(model)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({reason}); download it first and pass its directory"
        ) from exc
    return Path(local)


@dataclass
class ModelSource:
    """A model directory: its config, the tensor-name index, and a meta-device module tree."""

    path: Path
    config: PretrainedConfig
    tensor_files: dict[str, Path]
    tensor_entries: dict[str, TensorEntry]
    modules: dict[str, torch.nn.Module] = field(repr=False)
    layer_prefix: str | None
    num_layers: int

    @classmethod
    def open(cls, model: str | os.PathLike) -> ModelSource:
        path = resolve_model_dir(model)
        if not (path / "config.json").is_file():
            raise LlmpressError(f"{path} has no config.json; is it a Hugging Face model directory?")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise LlmpressError(f"cannot read {path / 'config.json'}: {exc}") from exc
        if getattr(config, "quantization_config", None):
            raise LlmpressError(
                f"{path} is already quantized ({_quant_method(config)}); start from the "
                "unquantized model"
            )
        tensor_files, tensor_entries = _index_tensors(path)
        with torch.device("meta"):
            try:
                tree = build_model(config, tensor_entries)
            except Exception as exc:
                raise LlmpressError(
                    f"transformers cannot build {model_class(config).__name__} from "
                    f"{path / 'config.json'}: {exc}"
                ) from exc
        modules = dict(tree.named_modules())
        prefix, count = _decoder_layers(modules)
        return cls(path, config, tensor_files, tensor_entries, modules, prefix, count)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensor_entries.values())

    def nbytes(self, name: str) -> int:
        return self.tensor_entries[name].nbytes

    def layer_of(self, tensor_name: str) -> int | None:
        """Index of the decoder layer a tensor belongs to, or None for embeddings, norms, heads."""
        if self.layer_prefix is None or not tensor_name.startswith(self.layer_prefix + "."):
            return None
        return int(tensor_name[len(self.layer_prefix) + 1 :].split(".", 1)[0])

    def tensors_by_layer(self) -> list[list[str]]:
        """Tensor names grouped so that one group is resident at a time: layers, then the rest."""
        groups: dict[int | None, list[str]] = defaultdict(list)
        for name in self.tensor_files:
            groups[self.layer_of(name)].append(name)
        ordered = [groups[i] for i in sorted(k for k in groups if k is not None)]
        # Embeddings, final norm and head: one tensor per group (they are the largest tensors).
        ordered += [[name] for name in groups.get(None, [])]
        return ordered

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors with plain file reads into fresh memory.

        Not through a memory map: mapped pages count in RSS for as long as any tensor from the
        file lives, and a small norm weight kept for the next shard would pin a whole shard.
        """
        out = {}
        for name in sorted(
            names, key=lambda n: (self.tensor_files[n], self.tensor_entries[n].start)
        ):
            file, entry = self.tensor_files[name], self.tensor_entries[name]
            try:
                with open(file, "rb", buffering=0) as f:
                    f.seek(entry.start)
                    data = bytearray(entry.nbytes)
                    if f.readinto(data) != entry.nbytes:
                        raise OSError("file is shorter than its header says")
            except OSError as exc:
                raise LlmpressError(f"cannot read {name!r} from {file}: {exc}") from exc
            tensor = (
                torch.frombuffer(data, dtype=entry.dtype)
                if data
                else torch.empty(0, dtype=entry.dtype)
            )
            out[name] = tensor.reshape(entry.shape)
        return out

    def read_chunks(self, name: str, chunk_bytes: int = 1 << 26):
        """A tensor's bytes in pieces, for copying large unquantized tensors without holding them."""
        file, entry = self.tensor_files[name], self.tensor_entries[name]
        chunk_bytes -= chunk_bytes % 8  # whole elements in every piece
        try:
            with open(file, "rb", buffering=0) as f:
                f.seek(entry.start)
                left = entry.nbytes
                while left:
                    data = bytearray(min(chunk_bytes, left))
                    if f.readinto(data) != len(data):
                        raise OSError("file is shorter than its header says")
                    left -= len(data)
                    yield data
        except OSError as exc:
            raise LlmpressError(f"cannot read {name!r} from {file}: {exc}") from exc

    def input_files(self) -> dict[str, Path]:
        """Every file a run reads, by name relative to the model folder: config, shards and
        their index, and what is copied through (tokenizer, generation config...)."""
        files = [self.path / "config.json", *self.tensor_files.values()]
        files += [*self.path.glob("*.safetensors.index.json"), *self.passthrough_files()]
        return {p.relative_to(self.path).as_posix(): p for p in files if p.is_file()}

    def passthrough_files(self) -> list[Path]:
        return sorted(
            p for p in self.path.iterdir() if p.is_file() and PASSTHROUGH_FILES.match(p.name)
        )


def model_class(config: PretrainedConfig) -> type:
    """The class the checkpoint was saved from (`architectures` in config.json), so that module
    names are the tensor names: an encoder saved as `BertModel` holds `encoder.layer.*`, which
    AutoModelForCausalLM would build as `bert.encoder.layer.*` under an LM head. A config that
    names no class transformers has: the causal LM, as before."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return AutoModelForCausalLM


def build_model(config: PretrainedConfig, tensor_names=None) -> torch.nn.Module:
    """`model_class(config)` built from the config (on the current default device); with the
    checkpoint's `tensor_names`, fused mixture-of-experts modules are rebuilt with one Linear
    per expert projection, as the checkpoint names them (llmpress.experts)."""
    cls = model_class(config)
    # _from_config: what every Auto*.from_config calls once it has the class
    model = cls.from_config(config) if cls is AutoModelForCausalLM else cls._from_config(config)
    if tensor_names is not None:
        unfuse_experts(model, tensor_names)
    return model


def _quant_method(config: PretrainedConfig) -> str:
    qc = config.quantization_config
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method or "unknown method")


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor's bytes lie in its safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _read_header(file: Path) -> dict[str, TensorEntry]:
    """The safetensors header: an 8-byte little-endian length, then JSON (the format's spec)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(f.read(size))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
        entries[name] = TensorEntry(
            SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin
        )
    return entries


def _index_tensors(path: Path) -> tuple[dict[str, Path], dict[str, TensorEntry]]:
    """Map every tensor name to its safetensors file and byte range, reading only headers."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".gguf")]
        hint = f" (found {', '.join(others)}; re-save it with save_pretrained)" if others else ""
        raise LlmpressError(f"{path} has no .safetensors weights{hint}")
    index: dict[str, Path] = {}
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            found = _read_header(file)
        except (OSError, ValueError, KeyError) as exc:
            raise LlmpressError(f"cannot read safetensors file {file}: {exc}") from exc
        entries.update(found)
        index.update(dict.fromkeys(found, file))
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        listed = json.loads(index_file.read_text()).get("weight_map", {})
        missing = sorted(set(listed) - set(index))
        if missing:
            raise LlmpressError(
                f"{index_file.name} lists {len(missing)} tensors that no shard holds "
                f"(first: {missing[0]}); the download is incomplete"
            )
    return index, entries


def _decoder_layers(modules: dict[str, torch.nn.Module]) -> tuple[str | None, int]:
    """The ModuleList holding the decoder layers: the longest one in the model that is not
    inside another (a layer's experts are one, and often outnumber the layers)."""
    lists = [n for n, m in modules.items() if isinstance(m, torch.nn.ModuleList)]
    best: tuple[str | None, int] = (None, 0)
    for name in lists:
        inside = any(name.startswith(f"{other}.") for other in lists if other)
        if not inside and len(modules[name]) > best[1]:
            best = (name, len(modules[name]))
    return best
