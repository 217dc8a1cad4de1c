"""GGUF files as sources: `surgery convert MODEL.gguf -o DIR`, and a plan's model given as a .gguf file.

Nothing here parses GGUF: the file is read by the `gguf` package's reader (memory-mapped) and
mapped by transformers' own GGUF support (the config keys, the tokenizer and its chat template,
tensor names, llama.cpp's q/k row permutation). What surgery adds is what a checkpoint tool owes
its users: the file is checked like hostile input before anything is written (magic, truncation,
tensor byte ranges inside the file, known quantization types, sizes that match), tensors are
dequantized one at a time and written at their offsets in the output shards (memory: one tensor,
not the model), the output folder is built through the output-folder protocol (complete or
absent), and surgery.json records the source and its SHA-256, so `surgery verify --sources`
re-reads the GGUF and compares every tensor.

A plan may name a `.gguf` file as a model: it is converted once into the cache
($SURGERY_CACHE/gguf/<sha256 prefix>, float32) and read from there like any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path

from surgery.errors import CheckpointError, OutputError, Problem
from surgery.io.outdir import OutputFolder, atomic_write, create_file, output_path
from surgery.io.safetensors import DTYPE_NAMES, itemsize

MAGIC = b"GGUF"
MAX_ELEMENTS = 1 << 40  # no tensor of a real model comes near; refuses absurd shapes before any allocation
OUT_DTYPES = ("bfloat16", "float32", "float16")
CONVERT_VERSION = 1


def _fail(path: Path, what: str, fix: str | None = None) -> CheckpointError:
    return CheckpointError(what, where=str(path), fix=fix or "give a complete GGUF file (llama.cpp's format), e.g. re-download it")


def file_sha256(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def open_gguf(path: str | Path):
    """The gguf package's reader over `path`, after checking that the file is one: the magic, that
    the reader can parse it, and that every tensor's type is known and its bytes lie in the file
    and match its shape. Any failure is a located CheckpointError; nothing is written."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise _fail(path, "is a dangling link")
    if not path.is_file():
        raise _fail(path, "no such GGUF file" if not path.exists() else "not a regular file", "give the path of a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != MAGIC:
        raise _fail(path, f"not a GGUF file (it starts with {head[:4]!r}, not {MAGIC!r})", "give a .gguf file written by llama.cpp")
    if size < 24:
        raise _fail(path, f"is truncated ({size} bytes; a GGUF header alone is 24)")
    try:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        raise OutputError("reading GGUF files needs the `gguf` package", fix="pip install 'surgery[gguf]' (or pip install gguf)") from None
    try:
        reader = GGUFReader(path)
    except (Exception, SystemExit) as e:  # the reader raises ValueError, struct.error, IndexError, OverflowError, ...
        raise _fail(path, f"is not a readable GGUF file: {type(e).__name__}: {str(e)[:200]}") from None
    for t in reader.tensors:
        where = f"{path} (tensor {t.name[:120]!r})"
        try:
            kind = GGMLQuantizationType(int(t.tensor_type))
        except ValueError:
            raise CheckpointError(
                f"unknown GGUF tensor type {int(t.tensor_type)}", where=where, fix="convert it with a current llama.cpp"
            ) from None
        shape = [int(x) for x in t.shape]
        if not shape or any(x <= 0 for x in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise CheckpointError(f"tensor shape {shape[:8]} is empty, negative or absurd", where=where, fix="the file is damaged")
        block, type_size = GGML_QUANT_SIZES[kind]
        n = math.prod(shape)
        if n % block:
            raise CheckpointError(f"{n} elements are not a whole number of {kind.name} blocks of {block}", where=where)
        want = n // block * type_size
        start = int(t.data_offset)
        if start < 0 or start + want > size:
            raise CheckpointError(
                f"tensor data [{start}, {start + want}) lies outside the file ({size:,} bytes): the file is truncated or damaged",
                where=where,
                fix="re-download the GGUF file",
            )
        if int(t.n_bytes) != want:
            raise CheckpointError(f"holds {int(t.n_bytes)} bytes; a {kind.name} tensor of shape {shape} needs {want}", where=where)
    if not reader.tensors:
        raise _fail(path, "holds no tensors")
    return reader


def _hf_config(path: Path):
    """transformers' config for the GGUF file (its own GGUF-to-config mapping), with what only
    describes the quantized file removed."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers' ValueError for an unsupported architecture, KeyError for a missing field
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        raise _fail(
            path,
            f"transformers cannot map this GGUF file to a config: {type(e).__name__}: {str(e)[:200]}",
            f"GGUF architectures transformers maps: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}",
        ) from None
    return cfg


def _family_check(path: Path, cfg) -> None:
    from surgery import registry

    if cfg.model_type not in registry.current().by_model_type:
        raise _fail(
            path,
            f"architecture {cfg.model_type!r} is not a family surgery knows",
            "convert a Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, NeoX or MoE model (surgery inspect lists families)",
        )


def _tensor_names(path: Path, reader, cfg):
    """GGUF tensor name -> HF name, and transformers' per-architecture processor (the q/k permutation)."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = str(reader.fields["general.architecture"].contents()) if "general.architecture" in reader.fields else cfg.model_type
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg.to_dict())
    try:
        mapping = get_gguf_hf_weights_map(model, processor)
    except Exception as e:
        raise _fail(path, f"transformers cannot map this file's tensor names: {type(e).__name__}: {str(e)[:200]}") from None
    return mapping, processor


def _tensors(path: Path, reader, cfg, torch_dtype):
    """(HF name, tensor) one at a time, dequantized and processed as transformers does when it loads the file."""
    import numpy as np
    import torch
    from gguf import dequantize

    mapping, processor = _tensor_names(path, reader, cfg)
    parsed = {"config": cfg.to_dict(), "tensors": {}}
    for t in reader.tensors:
        weights = dequantize(t.data, t.tensor_type)
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name not in mapping:
            continue
        yield mapping[result.name], torch.from_numpy(np.require(result.weights, requirements=["C", "W"])).to(torch_dtype)
    for name, tensor in parsed["tensors"].items():  # what a processor assembled itself (MoE experts)
        yield name, tensor.to(torch_dtype)


def convert(
    gguf_path: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    force: bool = False,
    progress: bool | None = None,
    shard_size: int = 5 * 10**9,
    echo=print,
    sha256: str | None = None,
) -> Path:
    """Write the HF checkpoint of a GGUF file to `out` (see the module's docstring). `sha256`: the
    file's hash when the caller has it already (the cache key), so it is not read twice."""
    import torch

    src = Path(gguf_path).expanduser().absolute()
    if dtype not in OUT_DTYPES:
        raise OutputError(f"--dtype {dtype!r}: choose one of {', '.join(OUT_DTYPES)}")
    code = DTYPE_NAMES[dtype]
    torch_dtype = getattr(torch, dtype)
    out = output_path(out)
    reader = open_gguf(src)  # everything about the file is checked before the output folder is touched
    cfg = _hf_config(src)
    _family_check(src, cfg)
    show = progress if progress is not None else sys.stderr.isatty()
    with OutputFolder(out, force=force, reads={"the GGUF file": src}) as folder:
        folder.check_target()
        staging = folder.fresh_staging()
        try:
            shards = _write_shards(src, reader, cfg, torch_dtype, code, staging, shard_size, show)
            _write_small_files(src, cfg, dtype, staging)
            weight_map = {name: s["name"] for s in shards for name in s.pop("tensors")}
            total = sum(s.pop("data_bytes") for s in shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            prov = {
                "format": 1,
                "converted": {
                    "from": str(src),
                    "sha256": sha256 or file_sha256(src),
                    "bytes": src.stat().st_size,
                    "dtype": dtype,
                    "version": CONVERT_VERSION,
                    "by": "gguf reader + transformers' GGUF mapping",
                },
                "output": {"shards": shards, "dtype": dtype},
            }
            atomic_write(staging / "surgery.json", json.dumps(prov, indent=2) + "\n")
            atomic_write(staging / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        except BaseException:
            folder.discard_staging()
            raise
        folder.publish()
    echo(f"wrote {out}: {len(weight_map)} tensors, {total / 1e6:,.1f} MB ({dtype}) from {src.name}")
    return out


def _write_shards(src: Path, reader, cfg, torch_dtype, code: str, staging: Path, shard_size: int, show: bool) -> list[dict]:
    """Tensors written as they are dequantized, each shard with a header region reserved up front
    (padded with spaces, as safetensors allows) so no tensor waits in memory for its neighbours."""
    import torch
    from tqdm import tqdm

    names_left = len(reader.tensors) + 8
    shards: list[dict] = []
    cur = None
    bar = tqdm(total=len(reader.tensors), unit="tensor", desc=f"converting {src.name}", disable=not show)

    def open_shard(k: int):
        reserve = 4096 + 160 * names_left
        reserve += -(8 + reserve) % 8
        path = staging / f"model-{k:05d}.safetensors"
        fd = create_file(path)
        return {"path": path, "fd": fd, "reserve": reserve, "pos": 0, "header": {"__metadata__": {"format": "pt"}}, "tensors": []}

    def close_shard(s: dict) -> None:
        hb = json.dumps(s["header"], separators=(",", ":")).encode()
        if len(hb) > s["reserve"]:
            raise OutputError(f"internal: the header of {s['path'].name} outgrew its reserved space")
        hb += b" " * (s["reserve"] - len(hb))
        os.pwrite(s["fd"], struct.pack("<Q", len(hb)) + hb, 0)
        os.close(s["fd"])
        shards.append({"file": s["path"], "tensors": s["tensors"], "data_bytes": s["pos"]})

    try:
        for name, tensor in _tensors(src, reader, cfg, torch_dtype):
            nbytes = tensor.numel() * itemsize(code)
            if cur is None or (cur["pos"] and cur["pos"] + nbytes > shard_size):
                if cur is not None:
                    close_shard(cur)
                cur = open_shard(len(shards) + 1)
            raw = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())  # no copy of the tensor
            at, done = 8 + cur["reserve"] + cur["pos"], 0
            while done < nbytes:  # pwrite may write less than asked
                done += os.pwrite(cur["fd"], raw[done:], at + done)
            cur["header"][name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [cur["pos"], cur["pos"] + nbytes]}
            cur["pos"] += nbytes
            cur["tensors"].append(name)
            names_left -= 1
            bar.update(1)
        if cur is not None:
            close_shard(cur)
    finally:
        bar.close()
    # final names: model-0000k-of-0000n (the count is known only now)
    from surgery.io.safetensors import file_crc32, header_sha256

    out = []
    for k, s in enumerate(shards, 1):
        final = s["file"].with_name(f"model-{k:05d}-of-{len(shards):05d}.safetensors")
        os.replace(s["file"], final)
        out.append(
            {
                "name": final.name,
                "bytes": final.stat().st_size,
                "header_sha256": header_sha256(final),
                "crc32": file_crc32(final),
                "tensors": s["tensors"],
                "data_bytes": s["data_bytes"],
            }
        )
    return out


def _write_small_files(src: Path, cfg, dtype: str, staging: Path) -> None:
    """config.json (transformers' mapping of the GGUF metadata, the output dtype, no quantization),
    generation_config.json, and the tokenizer with its chat template as transformers builds it."""
    import transformers

    cfg = cfg.__class__.from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    cfg.dtype = dtype
    cfg.architectures = cfg.architectures or [_causal_lm_class(cfg)]
    cfg.save_pretrained(staging)
    try:
        transformers.GenerationConfig.from_model_config(cfg).save_pretrained(staging)
    except Exception:  # a config without generation fields: the model still loads
        pass
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception as e:
        raise _fail(src, f"transformers cannot build the tokenizer from this file: {type(e).__name__}: {str(e)[:200]}") from None
    tok.save_pretrained(staging)


def _causal_lm_class(cfg) -> str:
    import transformers

    cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    return cls.__name__


def cached_conversion(path: str | Path, where: str | None = None) -> Path:
    """The checkpoint folder of a `.gguf` model named in a plan: converted once (float32) into
    $SURGERY_CACHE/gguf/<sha256 prefix>, then reused; a changed file gets a new folder."""
    src = Path(path).expanduser().absolute()
    open_gguf(src)  # a hostile file is refused before it is hashed
    root = Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery") / "gguf"
    digest = file_sha256(src)
    folder = root / f"{src.stem[:80]}-{digest[:24]}"
    if (folder / "model.safetensors.index.json").is_file() and (folder / "surgery.json").is_file():
        return folder
    convert(src, folder, dtype="float32", force=True, progress=False, echo=lambda *a: None, sha256=digest)
    return folder


def is_conversion(out: str | Path) -> bool:
    """Whether `out` is a `surgery convert` output (its surgery.json records a GGUF source, no plan)."""
    from surgery.errors import SurgeryError
    from surgery.io.provenance import read_provenance

    try:
        prov = read_provenance(out)
    except (SurgeryError, OSError):
        return False
    return prov is not None and prov.converted is not None and prov.plan is None


def recompute_converted(out: str | Path) -> list[Problem]:
    """`surgery verify --sources` for a converted folder: the GGUF file recorded in surgery.json is
    read again and every tensor compared with the shards, byte for byte."""
    import torch
    from safetensors import safe_open

    from surgery.io.provenance import read_provenance

    out = Path(out)
    prov = read_provenance(out, required=True)
    conv = prov.converted
    if not isinstance(conv, dict) or not isinstance(conv.get("from"), str) or conv.get("dtype") not in OUT_DTYPES:
        return [Problem(str(out / "surgery.json"), "records no GGUF source to recompute from")]
    src = Path(conv["from"])
    if not src.is_file():
        return [Problem(str(src), "the recorded GGUF source is gone", "verify without --sources, or put the file back")]
    if file_sha256(src) != conv.get("sha256"):
        return [Problem(str(src), "the GGUF source changed since the conversion (its SHA-256 differs)", "convert it again")]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    reader = open_gguf(src)
    cfg = _hf_config(src)
    problems: list[Problem] = []
    seen = set()
    handles: dict = {}
    try:
        for name, tensor in _tensors(src, reader, cfg, getattr(torch, conv["dtype"])):
            seen.add(name)
            fname = index.get(name)
            if fname is None:
                problems.append(Problem(str(out), f"tensor {name} of the GGUF file is missing from the output"))
                continue
            if fname not in handles:
                handles[fname] = safe_open(str(out / fname), "pt")
            got = handles[fname].get_tensor(name)
            if got.shape != tensor.shape or not torch.equal(got.view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)):
                problems.append(Problem(str(out / fname), f"tensor {name} differs from its recomputation from {src.name}"))
    finally:
        handles.clear()
    extra = sorted(set(index) - seen)
    if extra:
        problems.append(Problem(str(out), f"{len(extra)} tensor(s) are not in the GGUF file (e.g. {extra[0]})"))
    return problems
